"""The errors a request can meet that are not the server's fault, shared by every layer.

`InvalidRequest` is the one class for "this request's input is outside its limits": the
sampling parameters, the engine's admission checks and the chat template raise it (or a
subclass) with a message naming the field and the limit, and only it maps to gRPC
INVALID_ARGUMENT / HTTP 400. Any other exception is the server's: INTERNAL, with no text.
"""
from __future__ import annotations


class InvalidRequest(ValueError):
    """A request field is outside its limits; the message names the field and the limit."""


class QueueFull(RuntimeError):
    """More requests are waiting than `max_waiting`: try again later (RESOURCE_EXHAUSTED)."""
