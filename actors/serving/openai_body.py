"""The base of the OpenAI HTTP API's request models (actors/serving/openai_api.py and the
structured-output fields of actors/serving/openai_structured.py): a JSON object read strictly,
unknown fields refused, null an optional field's default, and a lone surrogate anywhere in a
request refused before anything reads it, naming where it is."""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict, model_validator
from pydantic_core import PydanticCustomError

from model.errors import lone_surrogate_at, surrogate_message

# OpenAI request fields this server does not implement, accepted as null (their default):
# the `openai` SDK's nullable create() parameters (openai/types/chat/completion_create_params.py)
NULL_ONLY = frozenset({"audio", "modalities", "prediction", "reasoning_effort", "service_tier",
                       "prompt_cache_key", "prompt_cache_retention", "safety_identifier",
                       "verbosity", "web_search_options", "moderation", "functions",
                       "function_call"})
SURROGATE = "lone_surrogate"            # the pydantic error type of a string holding one


class Body(BaseModel):
    """A JSON object of a request: strict (no lax coercion: true -> 1, "0.5" -> 0.5, ["1"] ->
    [1]; ints still pass as floats), unknown fields refused, null for an optional field its
    default."""
    model_config = ConfigDict(extra="forbid", strict=True)

    @model_validator(mode="before")
    @classmethod
    def _null_is_the_default(cls, data):
        if not isinstance(data, dict):
            return data
        optional = {name for name, f in cls.model_fields.items() if not f.is_required()}
        return {k: v for k, v in data.items()
                if v is not None or (k not in optional and k not in NULL_ONLY)}


def find_surrogate(body) -> tuple[str, str] | None:
    """(field, refusal) of the first string (a value or a key) of a JSON value that holds a
    lone surrogate, the field its path (`messages[1].content`; `logit_bias` for a key; `body`
    for the body's own keys); else None.
    Iterative: a body as deep as the JSON parser allows is no recursion error here."""
    stack = [(body, "")]
    while stack:
        value, path = stack.pop()
        if isinstance(value, str):
            if (at := lone_surrogate_at(value)) is not None:
                return path or "body", surrogate_message(path or "body", value, at)
        elif isinstance(value, dict):
            for key in value:
                if isinstance(key, str) and (at := lone_surrogate_at(key)) is not None:
                    return path or "body", surrogate_message(f"{path or 'body'} (a key)",
                                                             key, at)
            stack += reversed([(v, f"{path}.{k}" if path else str(k)) for k, v in value.items()
                               if isinstance(v, (str, dict, list))])
        elif isinstance(value, list):
            stack += reversed([(v, f"{path}[{i}]") for i, v in enumerate(value)
                               if isinstance(v, (str, dict, list))])
    return None


class Request(Body):
    """A request's body: Body, and a lone surrogate in any string refused first."""
    @model_validator(mode="before")
    @classmethod
    def _no_lone_surrogates(cls, data):
        """Before anything else reads (or quotes) a string: the tokenizer cannot take one, nor
        can a response echo one (no UTF-8 spells it)."""
        if (found := find_surrogate(data)) is not None:
            field, message = found
            # the context replaces "{key}"s in order, without escapes: the message goes last
            raise PydanticCustomError(SURROGATE, "{message}", {"field": field, "message": message})
        return data
