"""The same weights give the same prompt tokens and the same greedy tokens on transformers and llama.cpp."""

from __future__ import annotations

import pytest

from tandemlm.deploy.registry import load_engine
from tandemlm.deploy.types import SamplingParams

ARCHS = ["llama", "qwen2", "deepseek_v3"]
CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Name three colours, please."},
    {"role": "assistant", "content": "Red, green, blue."},
    {"role": "user", "content": "And two more? Ünïcödé ✓"},
]


@pytest.fixture(scope="module", params=ARCHS)
def engines(request):
    hf_dir = request.getfixturevalue(f"tiny_{request.param}_dir")
    gguf = request.getfixturevalue(f"tiny_{request.param}_gguf")
    hf = load_engine(str(hf_dir), backend="transformers")
    cpp = load_engine(str(gguf), backend="llama.cpp", n_ctx=512, n_parallel=2)
    yield request.param, hf, cpp
    hf.close()
    cpp.close()


def test_same_messages_give_the_same_prompt_tokens(engines):
    _, hf, cpp = engines
    hf_prompt, cpp_prompt = hf.render_chat(CONVERSATION), cpp.render_chat(CONVERSATION)
    assert hf_prompt == cpp_prompt
    assert hf.tokenize(hf_prompt) == cpp.tokenize(cpp_prompt)


def test_greedy_decoding_gives_the_same_tokens(engines):
    arch, hf, cpp = engines
    prompt_ids = hf.tokenize(hf.render_chat(CONVERSATION))
    params = SamplingParams(temperature=0, max_tokens=16)
    hf_tokens = [t.token_id for t in hf.stream_tokens(prompt_ids, params)]
    cpp_tokens = [t.token_id for t in cpp.stream_tokens(prompt_ids, params)]
    assert len(hf_tokens) > 4, arch
    assert hf_tokens == cpp_tokens, arch


def test_token_logprobs_agree(engines):
    _, hf, cpp = engines
    response = "Yellow and purple."
    hf_scores = hf.token_logprobs(CONVERSATION, response)
    cpp_scores = cpp.token_logprobs(CONVERSATION, response)
    assert [t for t, _ in hf_scores] == [t for t, _ in cpp_scores]
    for (_, a), (_, b) in zip(hf_scores, cpp_scores, strict=True):
        assert a == pytest.approx(b, rel=5e-3, abs=2e-3)
