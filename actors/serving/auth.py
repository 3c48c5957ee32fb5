"""An optional API key for both APIs: gRPC metadata `authorization: Bearer <key>` and the same
HTTP header (what the `openai` client sends for its `api_key`).

The key comes from the Serve args, as the name of an environment variable (`api_key_env`) or
of a file (`api_key_file`; its text, trailing newline stripped) read where `build_app` runs;
only its SHA-256 digest travels to the gateway replicas (in Serve's stored deployment args),
and a presented key is compared by digest with `hmac.compare_digest` (constant time). Neither
the key nor a presented one is ever logged. Health checks (`grpc.health.v1.Health/Check`,
`GET /health`) stay open: probes send no credentials. Every other HTTP path needs the key, the
API's documentation too (`/docs`, `/redoc`, `/openapi.json`: every field and limit).
"""
from __future__ import annotations

import hashlib
import hmac
import os
from pathlib import Path

SCHEME = "bearer"
MESSAGE = "missing or wrong API key: send the header  authorization: Bearer <key>"


class Unauthenticated(Exception):
    """A call without the API key: gRPC UNAUTHENTICATED, HTTP 401."""

    def __init__(self):
        super().__init__(MESSAGE)


def key_digest(args: dict) -> str | None:
    """The SHA-256 hex digest of the API key named by the Serve args, None if they name none.
    ValueError naming the arg: both given, the variable unset, the file unreadable, the key
    empty or holding whitespace."""
    env, file = args.get("api_key_env"), args.get("api_key_file")
    if env is None and file is None:
        return None
    if env is not None and file is not None:
        raise ValueError("set one of api_key_env and api_key_file, not both")
    if env is not None:
        if not isinstance(env, str) or env not in os.environ:
            raise ValueError(f"api_key_env: the environment variable {env!r} is not set")
        key, where = os.environ[env], "api_key_env"
    else:
        try:
            key, where = Path(file).read_text(encoding="utf-8").rstrip("\r\n"), "api_key_file"
        except (OSError, TypeError, UnicodeDecodeError) as e:
            raise ValueError(f"api_key_file: cannot read {file!r}: {type(e).__name__}") from None
    if not key or any(c.isspace() for c in key):
        raise ValueError(f"{where}: the API key must be non-empty and hold no whitespace")
    return digest(key)


# The digest this process's HTTP API requires: set by the Gateway replica (one per process) and
# read by its FastAPI middleware. Serve pickles the ingress class and its app by value, so a
# name in actors/serving/gateway.py seen from the replica's methods is a copy; this module is
# imported.
_required: dict[str, str | None] = {"digest": None}


def require(expected_digest: str | None) -> None:
    _required["digest"] = expected_digest


def required_digest() -> str | None:
    return _required["digest"]


def digest(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()   # any str


def authorized(expected_digest: str | None, header: str | None) -> bool:
    """Whether an `authorization` header value carries the key (always, with no key set)."""
    if expected_digest is None:
        return True
    scheme, _, key = (header or "").strip().partition(" ")
    presented = digest(key.strip()) if scheme.lower() == SCHEME else ""
    return hmac.compare_digest(presented, expected_digest)


def grpc_authorization(metadata) -> str | None:
    """The `authorization` value of gRPC invocation metadata ((key, value) pairs)."""
    for key, value in metadata or ():
        if key.lower() == "authorization":
            return value
    return None
