"""DSL grammars: gen(regex=..., json_schema=...), gen_int, gen_string on a tiny model, in
process; every output matches its grammar."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from radixrt import Engine
from radixrt.lang import EngineBackend, GenParams, function, gen, gen_int, gen_string
from radixrt.lang.ops import INT_REGEX, STRING_REGEX
from tests.fixtures import json_schema_check as jsonschema

SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"},
                                           "k": {"enum": ["x", "y"]}},
          "required": ["ok", "k"], "additionalProperties": False}


@pytest.fixture(scope="module")
def backend(tiny_model_dir: Any) -> EngineBackend:
    return EngineBackend(Engine(str(tiny_model_dir("llama")), page_size=16,
                                kv_cache_tokens=4096))


@function
def record(s: Any) -> None:
    s += "Name: "
    s += gen_string("name", max_tokens=40)
    s += "\nAge: "
    s += gen_int("age")
    s += "\nColor: "
    s += gen("color", regex="(red|green|blue)")
    s += "\nJSON: "
    s += gen("obj", max_tokens=60, json_schema=SCHEMA)


def test_dsl_grammars_hold(backend: EngineBackend) -> None:
    for seed in range(3):
        st = record.run(backend=backend, temperature=1.0, seed=seed)
        if st.get_meta_info("name")["finish_reason"] == "stop":
            assert re.fullmatch(STRING_REGEX, st["name"]) and isinstance(json.loads(st["name"]), str)
        if st.get_meta_info("age")["finish_reason"] == "stop":
            assert re.fullmatch(INT_REGEX, st["age"])
            int(st["age"])
        assert st["color"] in ("red", "green", "blue")
        if st.get_meta_info("obj")["finish_reason"] == "stop":
            jsonschema.validate(json.loads(st["obj"]), SCHEMA)


def test_grammar_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match="not both"):
        gen("x", choices=["a"], regex="a")
    with pytest.raises(ValueError, match="at most one"):
        GenParams(regex="a", ebnf='root ::= "a"')
    with pytest.raises(ValueError, match="json_schema"):
        gen("x", json_schema=3)
    assert GenParams(regex="a+").as_dict()["regex"] == "a+"
