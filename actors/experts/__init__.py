"""The expert data plane: expert actors, their transports, dispatcher, load window, pool and
live scaling. Never imports actors.serving (tests/unit/test_layering.py)."""
