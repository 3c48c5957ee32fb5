"""The OpenAI HTTP API's error bodies: {"error": {"message", "type", "param", "code"}}, as
OpenAI's server writes them; a 400 whose message starts with a request field names it in
`param` ("max_tokens must be...", "messages[0].role: ...", "tools[2].function.name: ...",
"structured_outputs.regex: ...")."""
from __future__ import annotations

import re

from actors.serving.openai_api import REQUEST_FIELDS

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               405: "invalid_request_error", 429: "rate_limit_error", 503: "service_unavailable",
               500: "internal_server_error"}
# a message that starts with a request field ("max_tokens must be...", "messages[0].role: ...")
# names it in the error's `param` too
_LEADING_FIELD = re.compile(r"([a-z_]+)(\[\d+\]|\.[a-z_]+)*(?=[ :])")


def error_body(status: int, message: str, param: str | None = None,
               code: str | None = None) -> dict:
    """OpenAI's error object; a 400 whose message starts with a field names it in `param`."""
    if param is None and status == 400 and (m := _LEADING_FIELD.match(message)) \
            and m.group(1) in REQUEST_FIELDS:
        param = m.group(0)
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "error"),
                      "param": param, "code": code}}
