"""Tool calling: parsers per format (whole and streamed), template detection, forced-call schemas, checks."""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path

import pytest

from tandemlm.deploy.tool_specs import (
    TemplateArguments,
    forced_call_schema,
    messages_for_template,
    tools_system_prompt,
    validate_tools,
)
from tandemlm.deploy.tools import (
    DS_CALL_BEGIN,
    DS_CALL_END,
    DS_CALLS_BEGIN,
    DS_CALLS_END,
    DS_SEP,
    ToolCall,
    calls_from_forced_json,
    get_parser,
    parser_for,
    template_supports_tools,
)

WEATHER = {"city": "Paris", "unit": "celsius"}
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    },
    {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}},
]


def hermes(name: str, args: dict) -> str:
    return f'<tool_call>\n{{"name": "{name}", "arguments": {json.dumps(args)}}}\n</tool_call>'


def ds_v3(*calls: tuple[str, dict]) -> str:
    body = "\n".join(
        f"{DS_CALL_BEGIN}function{DS_SEP}{name}\n```json\n{json.dumps(args)}\n```{DS_CALL_END}" for name, args in calls
    )
    return DS_CALLS_BEGIN + body + DS_CALLS_END


def ds_v31(*calls: tuple[str, dict]) -> str:
    body = "".join(f"{DS_CALL_BEGIN}{name}{DS_SEP}{json.dumps(args)}{DS_CALL_END}" for name, args in calls)
    return DS_CALLS_BEGIN + body + DS_CALLS_END


def named(calls: list[ToolCall]) -> list[tuple[str, dict]]:
    """Calls as (name, arguments object): ids are random and argument spacing is not the point."""
    return [(call.name, json.loads(call.arguments)) for call in calls]


# (parser, text, expected content, expected calls)
CASES = [
    ("hermes", "Let me check. " + hermes("get_weather", WEATHER), "Let me check. ", [("get_weather", WEATHER)]),
    (
        "hermes",
        hermes("get_weather", WEATHER) + "\n" + hermes("get_time", {}) + " done",
        "\n done",
        [("get_weather", WEATHER), ("get_time", {})],
    ),
    ("hermes", "No tools needed: 2 < 3 and <tool> is fine.", "No tools needed: 2 < 3 and <tool> is fine.", []),
    ("hermes", '<tool_call>\n{"name": "get_weather", "arguments": {"city": \n</tool_call>x', None, []),
    ("hermes", 'A<tool_call>{"name": "get_time", "arguments": "{}"}', "A", [("get_time", {})]),  # cut at EOS
    ("hermes", 'A<tool_call>{"name": "get_time", "argu', None, []),  # cut mid-call: raw text stays
    ("deepseek_v3", "Sure." + ds_v3(("get_weather", WEATHER)), "Sure.", [("get_weather", WEATHER)]),
    (
        "deepseek_v3",
        ds_v3(("get_weather", WEATHER), ("get_time", {})),
        "",
        [("get_weather", WEATHER), ("get_time", {})],
    ),
    (
        "deepseek_v3",
        ds_v31(("get_weather", WEATHER), ("function", {})),
        "",
        [("get_weather", WEATHER), ("function", {})],
    ),
    ("deepseek_v3", ds_v3(("get_weather", WEATHER)).replace('"Paris"', "Paris"), None, []),
    ("deepseek_v3", f"{DS_CALLS_BEGIN}{DS_CALL_BEGIN}get_time{DS_SEP}{{}}{DS_CALL_END}", "", [("get_time", {})]),
    ("deepseek_v3", "plain <｜tool answer", "plain <｜tool answer", []),
    ("deepseek_v3", ds_v31(("get_time", {})).replace(DS_CALL_END, DS_CALL_END + "stray words"), None, []),
    ("llama3_json", '{"name": "a", "parameters": {}}x{"name": "b", "parameters": {}}', None, []),
    (
        "llama3_json",
        '{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}',
        "",
        [("get_weather", WEATHER)],
    ),
    (
        "llama3_json",
        '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}; '
        '{"name": "get_time", "parameters": {}}',
        "",
        [("get_weather", WEATHER), ("get_time", {})],
    ),
    ("llama3_json", '{"name": "Bob", "age": 3}', None, []),
    ("llama3_json", '{"name": "get_time", "parameters": {}} and more', None, []),
    ("llama3_json", "  It is sunny {today}.", None, []),
    (
        "json",
        '```json\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n```',
        "",
        [("get_weather", WEATHER)],
    ),
    (
        "json",
        '  {"tool_calls": [{"name": "get_time", "arguments": {}}, {"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}]}',
        "",
        [("get_time", {}), ("get_weather", WEATHER)],
    ),
    ("json", '{"answer": 42}', None, []),
    ("json", '{"tool_calls": [{"name": "get_time", "arguments": {}}, {"oops": 1}]}', None, []),
    ("json", "```python\nprint(1)\n```", None, []),
    ("json", "", "", []),
]


@pytest.mark.parametrize(("parser_name", "text", "content", "calls"), CASES)
def test_parse_whole_reply(parser_name: str, text: str, content: str | None, calls: list) -> None:
    got_content, got_calls = get_parser(parser_name).parse(text)
    assert got_content == (text if content is None else content)  # None: the whole text stays content
    assert named(got_calls) == calls
    for call in got_calls:
        assert call.id.startswith("call_") and len(call.id) > 10
        assert isinstance(json.loads(call.arguments), dict)
    assert len({call.id for call in got_calls}) == len(got_calls)


def random_pieces(text: str, rng: random.Random) -> list[str]:
    cuts = sorted(rng.sample(range(1, len(text)), k=min(len(text) - 1, rng.randint(1, 12)))) if len(text) > 1 else []
    bounds = [0, *cuts, len(text)]
    return [text[a:b] for a, b in itertools.pairwise(bounds)]


@pytest.mark.parametrize(("parser_name", "text", "content", "calls"), CASES)
def test_streaming_matches_parse_for_any_split(parser_name: str, text: str, content: str | None, calls: list) -> None:
    parser = get_parser(parser_name)
    whole_content, whole_calls = parser.parse(text)
    rng = random.Random(hash(text) & 0xFFFF)
    splits = [[text], list(text)] + [random_pieces(text, rng) for _ in range(40)]
    for pieces in splits:
        stream = parser.streamer()
        out, deltas = [], []
        for piece in pieces:
            text_out, new = stream.feed(piece)
            out.append(text_out)
            deltas += new
        text_out, new = stream.flush()
        out.append(text_out)
        deltas += new
        assert "".join(out) == whole_content, pieces
        assert named(stream.calls) == named(whole_calls), pieces
        # Deltas: the first of each call carries id and name; the arguments pieces join to the call's.
        for index, call in enumerate(stream.calls):
            mine = [d for d in deltas if d.index == index]
            assert mine[0].id == call.id and mine[0].name == call.name
            assert all(d.id is None and d.name is None for d in mine[1:])
            assert "".join(d.arguments for d in mine) == call.arguments
        assert {d.index for d in deltas} == set(range(len(stream.calls)))


def test_content_before_a_call_streams_at_once_and_the_call_is_held() -> None:
    stream = get_parser("hermes").streamer()
    assert stream.feed("Checking the weather <tool") == ("Checking the weather ", [])
    assert stream.feed('_call>\n{"name": "get_weather", "arguments": {"city": "Pa') == ("", [])
    content, deltas = stream.feed('ris"}}\n</tool_call>\nOK')
    assert content == "\nOK"
    assert [(d.index, d.name, json.loads(d.arguments)) for d in deltas] == [(0, "get_weather", {"city": "Paris"})]
    assert stream.flush() == ("", [])

    ds = get_parser("deepseek_v3").streamer()
    assert ds.feed("Sure<｜tool▁ca") == ("Sure", [])  # held: may be the start of the calls section
    assert ds.feed("t>") == ("<｜tool▁cat>", [])

    whole = get_parser("llama3_json").streamer()
    assert whole.feed("  The answer") == ("  The answer", [])  # not a call: streams without waiting
    held = get_parser("llama3_json").streamer()
    assert held.feed(' {"name": "get_time",') == ("", [])


def test_get_parser_names_the_known_parsers() -> None:
    with pytest.raises(ValueError, match=r"hermes.*deepseek_v3.*llama3_json.*json"):
        get_parser("mistral")
    assert {get_parser(n).name for n in ("hermes", "deepseek_v3", "llama3_json", "json")} == {
        "hermes",
        "deepseek_v3",
        "llama3_json",
        "json",
    }


# Real templates -------------------------------------------------------------------------------


def fixture_template(folder: Path) -> str:
    path = folder / "chat_template.jinja"
    if path.is_file():
        return path.read_text()
    return json.loads((folder / "tokenizer_config.json").read_text())["chat_template"]


def test_fixture_templates(tiny_llama_dir: Path, tiny_qwen2_dir: Path, tiny_deepseek_v3_dir: Path) -> None:
    smollm2, r1_qwen, v3 = (fixture_template(d) for d in (tiny_llama_dir, tiny_qwen2_dir, tiny_deepseek_v3_dir))
    # None of them lists tools itself (the server then adds tools_system_prompt); the DeepSeek ones
    # still write past calls in DeepSeek's format.
    assert [template_supports_tools(t) for t in (smollm2, r1_qwen, v3)] == [False, False, False]
    assert [parser_for(t).name for t in (smollm2, r1_qwen, v3)] == ["json", "deepseek_v3", "deepseek_v3"]
    assert parser_for(None).name == "json" and not template_supports_tools(None)


LLAMA_CPP_TEMPLATES = {
    "Qwen-Qwen2.5-7B-Instruct": ("hermes", True),
    "Qwen-Qwen3-0.6B": ("hermes", True),
    "NousResearch-Hermes-3-Llama-3.1-8B-tool_use": ("hermes", True),
    "deepseek-ai-DeepSeek-R1-Distill-Qwen-32B": ("deepseek_v3", False),
    "deepseek-ai-DeepSeek-V3.1": ("deepseek_v3", False),
    "llama-cpp-deepseek-r1": ("deepseek_v3", True),
    "meta-llama-Llama-3.1-8B-Instruct": ("llama3_json", True),
    "meta-llama-Llama-3.2-3B-Instruct": ("llama3_json", True),
    "google-gemma-2-2b-it": ("json", False),
    "microsoft-Phi-3.5-mini-instruct": ("json", False),
}


def llama_cpp_template(name: str) -> str:
    from tandemlm.models.builtin import cache_dir

    paths = sorted(cache_dir().glob(f"llama.cpp-*/models/templates/{name}.jinja"))
    if not paths:
        pytest.skip("llama.cpp's templates are not cached here")
    return paths[-1].read_text()


@pytest.mark.parametrize(("name", "expected"), LLAMA_CPP_TEMPLATES.items())
def test_llama_cpp_templates(name: str, expected: tuple[str, bool]) -> None:
    template = llama_cpp_template(name)
    assert (parser_for(template).name, template_supports_tools(template)) == expected


def test_tools_only_as_a_string_literal_do_not_count() -> None:
    assert not template_supports_tools("{{ 'tools are nice' }}{% for m in messages %}{{ m.content }}{% endfor %}")
    assert template_supports_tools("{% if tools %}{{ tools | tojson }}{% endif %}")
    assert not template_supports_tools("{% set tools = [] %}{{ tools }}")
    assert template_supports_tools("{% for t in tools %}{% generation %}{{ t }}{% endgeneration %}{% endfor %}")


def render(template: str, messages: list[dict], tools: list[dict] | None) -> str:
    from transformers.utils.chat_template_utils import render_jinja_template

    rendered = render_jinja_template(
        conversations=[messages], chat_template=template, tools=tools, add_generation_prompt=True
    )
    rendered = rendered[0] if isinstance(rendered, tuple) else rendered
    return rendered if isinstance(rendered, str) else rendered[0]


CONVERSATION = [
    {"role": "user", "content": "Weather in Paris?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"},
]


def test_rendering_a_tool_conversation_with_fixture_templates(tiny_qwen2_dir: Path, tiny_deepseek_v3_dir: Path) -> None:
    for folder in (tiny_qwen2_dir, tiny_deepseek_v3_dir):
        template = fixture_template(folder)
        assert not template_supports_tools(template)
        # What the server does for such a template: the tools go in a system message.
        messages = [{"role": "system", "content": tools_system_prompt(TOOLS)}, *messages_for_template(CONVERSATION)]
        prompt = render(template, messages, TOOLS)
        assert "get_weather" in prompt and "get_time" in prompt and "Current weather in a city" in prompt
        assert "sunny, 21 C" in prompt
        # The past call is written in DeepSeek's own format, and reads back as the same call.
        section = prompt[prompt.index(DS_CALLS_BEGIN) : prompt.index(DS_CALLS_END) + len(DS_CALLS_END)]
        assert named(get_parser("deepseek_v3").parse(section)[1]) == [("get_weather", {"city": "Paris"})]


def test_templates_that_need_arguments_as_text_or_as_an_object(
    tiny_qwen2_dir: Path, tiny_deepseek_v3_dir: Path
) -> None:
    parsed = [dict(m) for m in CONVERSATION]
    parsed[1] = {
        **parsed[1],
        "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}],
    }
    v3, r1 = fixture_template(tiny_deepseek_v3_dir), fixture_template(tiny_qwen2_dir)
    with pytest.raises(TypeError):  # DeepSeek-V3's template joins the arguments to strings with +
        render(v3, parsed, None)
    assert '"{\\"city\\": \\"Paris\\"}"' in render(r1, CONVERSATION, None)  # R1 tojson's them: text gets quoted
    for messages in (CONVERSATION, parsed):
        for template in (v3, r1):
            assert '```json\n{"city": "Paris"}\n```' in render(template, messages_for_template(messages), None)


def test_qwen25_template_lists_tools_and_results() -> None:
    template = llama_cpp_template("Qwen-Qwen2.5-7B-Instruct")
    prompt = render(template, messages_for_template(CONVERSATION), TOOLS)
    assert '"name": "get_time"' in prompt and "<tool_response>\nsunny, 21 C\n</tool_response>" in prompt
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in prompt


def test_template_arguments_and_messages_for_template() -> None:
    args = TemplateArguments({"b": 1}, '{"b":1}')
    assert args == {"b": 1} and str(args) == '{"b":1}' and "x" + args == 'x{"b":1}' and args + "y" == '{"b":1}y'
    assert json.dumps(args) == '{"b": 1}'
    original = [dict(CONVERSATION[1])]
    converted = messages_for_template(original)
    assert isinstance(converted[0]["tool_calls"][0]["function"]["arguments"], TemplateArguments)
    assert isinstance(original[0]["tool_calls"][0]["function"]["arguments"], str)  # input left alone
    bad = [{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{oops"}}]}]
    assert messages_for_template(bad)[0]["tool_calls"][0]["function"]["arguments"] == "{oops"
    # Templates without tool support get the calls as content, in the format the json parser reads.
    plain = messages_for_template(
        [{"role": "assistant", "content": "Let me look.", "tool_calls": CONVERSATION[1]["tool_calls"] * 2}],
        native=False,
    )
    assert "tool_calls" not in plain[0]
    content, calls = get_parser("json").parse(plain[0]["content"].split("\n", 1)[1])
    assert content == "" and named(calls) == [("get_weather", {"city": "Paris"})] * 2


def test_smollm2_template_with_the_system_prompt(tiny_llama_dir: Path) -> None:
    template = fixture_template(tiny_llama_dir)
    messages = [
        {"role": "system", "content": tools_system_prompt(TOOLS)},
        *messages_for_template(CONVERSATION, native=False),
    ]
    prompt = render(template, messages, TOOLS)
    assert '{"name": "get_weather", "arguments": {"city": "Paris"}}' in prompt
    assert "sunny, 21 C" in prompt and "get_time" in prompt


def test_system_prompt_format_is_what_the_json_parser_reads() -> None:
    prompt = tools_system_prompt(TOOLS)
    assert "get_weather: Current weather in a city" in prompt and '"required": ["city"]' in prompt
    assert "get_time: (no description)" in prompt
    one = '{"name": "get_time", "arguments": {}}'
    assert one.replace('"get_time"', '"<function name>"').replace("{}", "{<the arguments as a JSON object>}") in prompt
    assert '{"tool_calls": [' in prompt


# Forced calls ---------------------------------------------------------------------------------


def test_forced_call_schema_shapes() -> None:
    jsonschema = pytest.importorskip("jsonschema")
    assert forced_call_schema(TOOLS, "auto", True) is None and forced_call_schema(TOOLS, "none", True) is None
    one = forced_call_schema(TOOLS, "required", parallel=False)
    many = forced_call_schema(TOOLS, "required", parallel=True)
    named_one = forced_call_schema(TOOLS, {"type": "function", "function": {"name": "get_weather"}}, parallel=True)
    good = {"name": "get_weather", "arguments": {"city": "Paris"}}
    jsonschema.validate(good, one)
    jsonschema.validate({"name": "get_time", "arguments": {}}, one)
    jsonschema.validate([good, {"name": "get_time", "arguments": {}}], many)
    jsonschema.validate(good, named_one)
    for schema, bad in [
        (one, {"name": "nope", "arguments": {}}),
        (one, {"name": "get_weather", "arguments": {}}),  # city is required
        (one, [good]),
        (many, []),
        (named_one, {"name": "get_time", "arguments": {}}),
        (named_one, {"name": "get_weather", "arguments": {"city": "Paris"}, "extra": 1}),
    ]:
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)


def test_forced_call_schema_keeps_definitions_resolvable() -> None:
    jsonschema = pytest.importorskip("jsonschema")
    tools = [
        {
            "type": "function",
            "function": {
                "name": f"set_{kind}",
                "parameters": {
                    "type": "object",
                    "properties": {"value": {"$ref": "#/$defs/Value"}},
                    "required": ["value"],
                    "$defs": {"Value": {"type": kind}},
                },
            },
        }
        for kind in ("integer", "string")
    ]
    schema = forced_call_schema(tools, "required", parallel=True)
    jsonschema.validate(
        [{"name": "set_integer", "arguments": {"value": 3}}, {"name": "set_string", "arguments": {"value": "x"}}],
        schema,
    )
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate([{"name": "set_integer", "arguments": {"value": "x"}}], schema)
    assert tools[0]["function"]["parameters"]["$defs"]  # the request's tools are not changed


def test_forced_call_schema_compiles_in_llguidance() -> None:
    llguidance = pytest.importorskip("llguidance")
    for choice, parallel in [
        ("required", True),
        ("required", False),
        ({"type": "function", "function": {"name": "get_time"}}, True),
    ]:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(forced_call_schema(TOOLS, choice, parallel))
        assert llguidance.LLMatcher.validate_grammar_with_warnings(grammar)[0] is False


def test_calls_from_forced_json() -> None:
    assert named(calls_from_forced_json('{"name": "get_weather", "arguments": {"city": "Paris"}}')) == [
        ("get_weather", {"city": "Paris"})
    ]
    assert named(
        calls_from_forced_json('[{"name": "a", "arguments": {}}, {"name": "b", "arguments": {"x": [1]}}]')
    ) == [
        ("a", {}),
        ("b", {"x": [1]}),
    ]
    assert calls_from_forced_json('{"name": "get_weather", "arguments": {"ci') == []  # cut short by max_tokens
    assert calls_from_forced_json("[]") == [] and calls_from_forced_json("") == []


# Request checks -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tools", "choice", "message"),
    [
        ("get_weather", "auto", "tools must be a list"),
        ([TOOLS[0], {"type": "function", "function": {}}], "auto", r"tools\[1\]\.function\.name is required"),
        ([{"type": "function"}], "auto", r"tools\[0\]\.function is required"),
        ([{"type": "retrieval", "function": {"name": "a"}}], "auto", r"tools\[0\]\.type must be 'function'"),
        ([{"function": {"name": "has space"}}], "auto", r"tools\[0\]\.function\.name must be"),
        ([TOOLS[0], TOOLS[0]], "auto", r"tools\[1\]\.function\.name 'get_weather' is already used"),
        ([{"function": {"name": "a", "parameters": "x"}}], "auto", r"tools\[0\]\.function\.parameters must be"),
        ([{"function": {"name": "a", "description": 3}}], "auto", r"tools\[0\]\.function\.description must be"),
        (
            TOOLS,
            {"type": "function", "function": {"name": "x"}},
            "tool_choice names function 'x' which is not in tools",
        ),
        (TOOLS, {"type": "function", "function": {}}, r"tool_choice\.function\.name is required"),
        (TOOLS, "sometimes", "tool_choice must be 'none', 'auto', 'required'"),
        ([], "required", "tool_choice 'required' needs tools"),
    ],
)
def test_validate_tools_names_the_bad_field(tools: object, choice: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        validate_tools(tools, choice)


def test_validate_tools_accepts_good_requests() -> None:
    for choice in (None, "none", "auto", "required", {"type": "function", "function": {"name": "get_time"}}):
        validate_tools(TOOLS, choice)
    validate_tools([{"type": "function", "function": {"name": "ns.tool-1"}}], "auto")
