"""actors/serving/auth.py: where the API key comes from, and which authorization headers carry
it."""
from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from actors.serving.auth import authorized, digest, grpc_authorization, key_digest


def test_the_key_comes_from_an_env_var_or_a_file(tmp_path, monkeypatch):
    monkeypatch.setenv("MY_KEY", "s3cret")
    assert key_digest({"api_key_env": "MY_KEY"}) == digest("s3cret")
    (tmp_path / "key").write_text("fromfile\n")
    assert key_digest({"api_key_file": str(tmp_path / "key")}) == digest("fromfile")
    assert key_digest({}) is None


@pytest.mark.parametrize("args, needle", [
    ({"api_key_env": "NOT_SET_ANYWHERE"},
     "api_key_env: the environment variable 'NOT_SET_ANYWHERE' is not set"),
    ({"api_key_file": "/no/such/file"}, "api_key_file: cannot read '/no/such/file'"),
    ({"api_key_env": "EMPTY_KEY"}, "api_key_env: the API key must be non-empty"),
    ({"api_key_env": "SPACED_KEY"}, "hold no whitespace"),
    ({"api_key_env": "X", "api_key_file": "y"}, "not both"),
])
def test_a_bad_key_source_names_the_arg_and_never_the_key(args, needle, monkeypatch):
    monkeypatch.setenv("EMPTY_KEY", "")
    monkeypatch.setenv("SPACED_KEY", "two words")
    with pytest.raises(ValueError, match=needle) as e:
        key_digest(args)
    assert "two words" not in str(e.value)


@given(key=st.text(st.characters(blacklist_categories=("Zs", "Cc")), min_size=1),
       other=st.text())
def test_only_the_bearer_key_is_authorized(key, other):
    expected = digest(key)
    assert authorized(expected, f"Bearer {key}")
    assert authorized(expected, f"bearer  {key} ")                 # scheme: any case
    assert not authorized(expected, None) and not authorized(expected, key)
    assert not authorized(expected, f"Basic {key}")
    assert authorized(expected, f"Bearer {other}") == (other.strip() == key)
    assert authorized(None, None) and authorized(None, "anything")  # no key set: all pass


def test_grpc_metadata_key_is_case_insensitive():
    assert grpc_authorization([("x", "1"), ("Authorization", "Bearer k")]) == "Bearer k"
    assert grpc_authorization([]) is None and grpc_authorization(None) is None


def _get(app, path: str, headers: dict) -> int:
    """The status of GET `path` on an ASGI app, called in-process."""
    import asyncio
    sent = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET",
             "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
             "root_path": "", "server": ("test", 80), "client": ("test", 1),
             "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()]}
    asyncio.run(app(scope, receive, send))
    return next(m["status"] for m in sent if m["type"] == "http.response.start")


@pytest.mark.parametrize("path", ["/docs", "/redoc", "/openapi.json", "/v1/models", "/nope"])
def test_with_a_key_set_every_http_path_but_health_needs_it(path, monkeypatch):
    """/docs, /redoc and /openapi.json (every field and limit) answered without the key."""
    from actors.serving import auth
    from actors.serving.gateway import Gateway  # noqa: F401 - serve.ingress binds the routes
    from actors.serving.http_app import OPEN_PATHS, openai_app
    monkeypatch.setitem(auth._required, "digest", digest("k3y"))
    assert _get(openai_app, path, {}) == 401
    assert _get(openai_app, path, {"Authorization": "Bearer nope"}) == 401
    if path in ("/docs", "/redoc", "/openapi.json"):
        assert _get(openai_app, path, {"Authorization": "Bearer k3y"}) == 200
    assert OPEN_PATHS == ("/health",)                      # probes send no credentials
    monkeypatch.setitem(auth._required, "digest", None)
    assert _get(openai_app, "/openapi.json", {}) == 200                  # no key set: open
