import pytest

from tandemlm.deploy.engine import Engine, collect
from tandemlm.deploy.mock_engine import MockEngine
from tandemlm.deploy.registry import backends, get_backend, load_engine, offered_backends
from tandemlm.deploy.types import ContextLengthError, SamplingParams
from tandemlm.errors import EngineError


def test_mock_engine_is_an_engine_registered_through_the_real_registry():
    engine = get_backend("mock").load(None, reply="hi")
    assert isinstance(engine, Engine)
    assert {"transformers", "llama.cpp", "vllm", "mock"} <= set(backends())


def test_the_mock_backend_loads_by_name_but_is_not_offered_to_users():
    assert get_backend("mock").hidden
    assert "mock" not in offered_backends()
    assert {"transformers", "llama.cpp", "vllm"} <= set(offered_backends())
    with pytest.raises(KeyError) as missed:
        get_backend("nope")
    assert "mock" not in str(missed.value)  # the hint lists what a user may pick


def test_unknown_backend_lists_the_known_ones():
    with pytest.raises(KeyError, match=r"unknown backend 'nope'; known backends: .*llama\.cpp.*transformers"):
        get_backend("nope")
    with pytest.raises(KeyError, match="known backends"):
        load_engine("smollm2", backend="nope")


def test_chat_counts_usage_and_reports_length_finish():
    engine = MockEngine(reply="abcdef")
    result = collect(engine.chat([{"role": "user", "content": "x"}], SamplingParams(max_tokens=3)))
    assert result.text == "abc"
    assert result.finish_reason == "length"
    assert result.usage.completion_tokens == 3
    assert result.usage.prompt_tokens == len(engine.tokenize(engine.render_chat([{"role": "user", "content": "x"}])))


def test_stop_string_ends_generation_early_and_cancels_the_backend_stream():
    engine = MockEngine(reply="one two STOP three four")
    result = collect(engine.chat([{"role": "user", "content": "x"}], SamplingParams(stop=["STOP"])))
    assert result.text == "one two "
    assert result.finish_reason == "stop"
    assert engine.cancelled == 1


def test_reasoning_comes_apart_from_the_answer():
    engine = MockEngine(reply="<think>2+2 is 4</think>\n\nFour.")
    result = collect(engine.chat([{"role": "user", "content": "2+2?"}], SamplingParams()))
    assert (result.reasoning, result.text) == ("2+2 is 4", "Four.")


def test_generate_does_not_split_reasoning():
    engine = MockEngine(reply="<think>x</think>y")
    assert collect(engine.generate("p", SamplingParams())).text == "<think>x</think>y"


def test_prompt_longer_than_context_is_refused_before_generating():
    engine = MockEngine(context_length=32)
    with pytest.raises(ContextLengthError, match="context window is 32 tokens"):
        engine.generate("x" * 32, SamplingParams(max_tokens=4))  # 32 characters could fit; with BOS, 33 tokens do not
    with pytest.raises(ContextLengthError, match="lower max_tokens"):
        engine.chat([{"role": "user", "content": "x"}], SamplingParams(max_tokens=30))


@pytest.mark.parametrize(
    ("messages", "message"),
    [
        ([], "at least one message"),
        ([{"role": "wizard", "content": "x"}], r"messages\[0\]\.role"),
        ([{"role": "user", "content": "ok"}, {"role": "user", "content": 3}], r"messages\[1\]\.content"),
    ],
)
def test_bad_messages_name_the_message(messages, message):
    with pytest.raises(EngineError, match=message):
        MockEngine().chat(messages, SamplingParams())


def test_token_logprobs_scores_each_response_token():
    engine = MockEngine(reply="ab")
    scores = engine.token_logprobs([{"role": "user", "content": "q"}], "ax")
    assert [t for t, _ in scores] == ["a", "x"]
    assert scores[0][1] > scores[1][1]


def test_a_prompt_longer_than_the_context_could_hold_is_refused_before_tokenizing():
    class NoTokenizing(MockEngine):
        def tokenize(self, text: str, add_special_tokens: bool = False) -> list[int]:
            raise AssertionError("tokenized a prompt that cannot fit")

    engine = NoTokenizing(context_length=100)
    with pytest.raises(ContextLengthError, match=r"prompt is 101 characters but the model's context window is 100 tokens"):
        engine.generate("x" * 101, SamplingParams(max_tokens=1))
    with pytest.raises(ContextLengthError, match="characters"):
        engine.chat([{"role": "user", "content": "y" * 200}], SamplingParams(max_tokens=1))
    with pytest.raises(AssertionError, match="tokenized"):  # a prompt that may fit is tokenized as usual
        engine.generate("x" * 50, SamplingParams(max_tokens=1))
