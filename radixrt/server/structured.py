"""Structured output at the router: request fields -> the grammar in SamplingParams.

``response_format`` (chat and completions), vLLM's ``guided_*`` fields and forced tool calls
(``tool_calls.forced_grammar``) become one of SamplingParams' regex / json_schema / ebnf; the
grammar is parsed here (xgrammar, no tokenizer) so a bad one is a 400 naming the field the
client used, before anything reaches a worker.
"""

from __future__ import annotations

import json
import re
from dataclasses import replace
from typing import Any

from radixrt.sampling_params import SamplingParams
from radixrt.server.errors import bad_request
from radixrt.server.protocol import ChatCompletionRequest, CompletionRequest


def check_grammar(params: SamplingParams, param: str | None = None) -> None:
    """400 naming the field when the request's regex / json_schema / ebnf does not parse."""
    if params.constraint is None:
        return
    kind, text = params.constraint
    try:
        from radixrt.constrained.grammar import GrammarError, check_syntax
    except ImportError:
        raise bad_request(f"{kind} needs the xgrammar package, which this server lacks",
                          param or kind) from None
    try:
        check_syntax(kind, text)
    except GrammarError as e:
        raise bad_request(str(e), param or kind) from None


def replace_params(params: SamplingParams, *, param: str, **changes: Any) -> SamplingParams:
    """dataclasses.replace, with a rejection as a 400 naming ``param``."""
    try:
        return replace(params, **changes)
    except (ValueError, TypeError) as e:
        raise bad_request(str(e), param) from None


def response_format_schema(fmt: dict[str, Any] | None) -> str | None:
    """OpenAI ``response_format`` -> the JSON schema text that constrains the output."""
    if fmt is None:
        return None
    kind = fmt.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return json.dumps({"type": "object"})
    if kind == "json_schema":
        spec = fmt.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), (dict, bool)):
            raise bad_request("response_format.json_schema must be {\"name\": ..., \"schema\": "
                              "{...}, \"strict\": ...}", "response_format")
        # strict or not, the output is held to the schema (strict only promises more).
        return json.dumps(spec.get("schema", {}))
    raise bad_request(f"response_format.type must be text, json_object or json_schema, got "
                      f"{kind!r}", "response_format")


def guided_constraint(req: ChatCompletionRequest | CompletionRequest) -> tuple[str, str, str] | None:
    """vLLM's ``guided_*`` fields -> (SamplingParams field, grammar text, the client's name)."""
    given = [(name, getattr(req, name)) for name in
             ("guided_json", "guided_regex", "guided_grammar", "guided_choice")
             if getattr(req, name) is not None]
    if not given:
        return None
    if len(given) > 1:
        raise bad_request(f"{given[0][0]} and {given[1][0]} are exclusive", given[1][0])
    name, value = given[0]
    if name == "guided_json":
        if isinstance(value, str):
            return "json_schema", value, name
        if not isinstance(value, (dict, bool)):
            raise bad_request("guided_json must be a JSON schema", name)
        return "json_schema", json.dumps(value), name
    if name == "guided_choice":
        if not value or not all(isinstance(c, str) and c for c in value):
            raise bad_request("guided_choice must be a non-empty list of non-empty strings", name)
        return "regex", "|".join(f"({re.escape(c)})" for c in value), name
    return ("regex" if name == "guided_regex" else "ebnf"), value, name


def apply_guided(params: SamplingParams, req: ChatCompletionRequest | CompletionRequest
                 ) -> SamplingParams:
    """``params`` with the request's guided_* grammar (checked: a 400 naming the field)."""
    g = guided_constraint(req)
    if g is None:
        return params
    field, text, name = g
    if params.constraint is not None:
        raise bad_request(f"{name} cannot be combined with response_format or a required tool "
                          "call", name)
    params = replace_params(params, param=name, **{field: text})
    check_grammar(params, name)
    return params
