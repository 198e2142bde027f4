"""JSON schemas to llguidance grammars: objects that list their properties take no other key.

Checked on the grammar itself (llguidance's matcher over a real tokenizer), so it holds whatever
the weights would write: a token sequence that adds a key is refused before any model samples it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tandemlm.deploy.constraints import closed_objects
from tandemlm.deploy.tool_specs import forced_call_schema
from tandemlm.deploy.types import OutputConstraint

CITY = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}  # no additionalProperties
WEATHER_TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": CITY}}
NAMED = {"type": "function", "function": {"name": "get_weather"}}


@pytest.fixture(scope="module")
def grammars(tiny_llama_dir: Path) -> Any:
    """llguidance over SmolLM2's tokenizer, as the transformers backend builds it (no model loaded)."""
    from transformers import AutoTokenizer

    from tandemlm.deploy.hf_sampling import JsonGrammars

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    return tokenizer, JsonGrammars(tokenizer, [tokenizer.eos_token_id])


def accepts(grammars: Any, schema: dict[str, Any], text: str) -> bool:
    """Whether the grammar for ``schema`` lets every token of ``text`` through and may then end."""
    tokenizer, built = grammars
    matcher = built.matcher(OutputConstraint(json_schema=schema)).matcher  # the llguidance matcher under the mask
    for token in tokenizer.encode(text, add_special_tokens=False):
        if not matcher.allows(token):
            return False
        matcher.consume(token)
    return matcher.allows(tokenizer.eos_token_id)


@pytest.mark.parametrize("parallel", [False, True])
@pytest.mark.parametrize("choice", ["required", NAMED], ids=["required", "named"])
def test_a_forced_call_grammar_refuses_keys_its_tool_does_not_list(grammars, choice, parallel):
    schema = forced_call_schema([WEATHER_TOOL], choice, parallel)
    call = '{"name": "get_weather", "arguments": {"city": "Paris"}}'
    invented = '{"name": "get_weather", "arguments": {"city": "Paris", "type": "string"}}'
    if parallel and choice == "required":
        call, invented = f"[{call}]", f"[{invented}]"
    assert accepts(grammars, schema, call)
    assert not accepts(grammars, schema, invented)


def test_response_format_schemas_follow_the_same_rule_and_can_opt_out(grammars):
    nested = {"type": "object", "properties": {"place": CITY, "tags": {"type": "array", "items": CITY}}}
    assert accepts(grammars, nested, '{"place": {"city": "Paris"}, "tags": [{"city": "Rome"}]}')
    assert not accepts(grammars, nested, '{"place": {"city": "Paris"}, "x": 1}')
    assert not accepts(grammars, nested, '{"place": {"city": "Paris", "x": 1}}')
    assert not accepts(grammars, nested, '{"tags": [{"city": "Rome", "x": 1}]}')
    assert accepts(grammars, {**CITY, "additionalProperties": True}, '{"city": "Paris", "x": 1}')
    assert accepts(grammars, {"type": "object"}, '{"anything": 1}')  # json_object: no properties listed


def test_closed_objects_reads_the_schema_structure_and_leaves_the_request_alone():
    schema = {
        "type": "object",
        "properties": {"properties": {"type": "object", "properties": {"a": {"type": "integer"}}}},
        "$defs": {"Item": {"type": "object", "properties": {"b": {"type": "string"}}}},
        "anyOf": [{"properties": {"c": {"type": "string"}}}],
        "allOf": [{"properties": {"d": {"type": "string"}}}, {"properties": {"e": {"type": "string"}}}],
    }
    closed = closed_objects(schema)
    # allOf branches add up to one object, so neither may refuse the other's keys; nor may the object holding them
    assert [branch.get("additionalProperties") for branch in closed["allOf"]] == [None, None]
    assert "additionalProperties" not in closed
    inner = closed["properties"]["properties"]  # a property named "properties" is a schema, not a keyword
    assert inner["additionalProperties"] is False and set(closed["properties"]) == {"properties"}
    assert closed["$defs"]["Item"]["additionalProperties"] is False
    assert closed["anyOf"][0]["additionalProperties"] is False
    assert "additionalProperties" not in schema["$defs"]["Item"]  # a copy: the request's schema is unchanged
    opened = {"type": "object", "properties": {"a": {}}, "additionalProperties": {"type": "integer"}}
    assert closed_objects(opened) == opened
