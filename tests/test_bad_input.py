"""The bad-input corpus: what a hostile-but-realistic user types, and the one line each must get.

One line per case. A CLI case is ``(args, exit code, pattern)``: the command must exit with that
code and print exactly one line, ``error: …`` matching the pattern, never a traceback, and it must
fail before anything heavy happens (no model is loaded, no server starts). An HTTP case is
``(path, body, status, pattern)`` against a live server: an OpenAI-shaped error whose message
matches, and the server still answers afterwards. ``{name}`` in a case is a file made by
:func:`files`. Adding a case is adding a line.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shlex

import httpx
import pytest
from typer.testing import CliRunner

from tandemlm.cli.main import app
from tandemlm.deploy.mock_engine import MockEngine

# One line per case, so the formatter keeps out of the tables.
# fmt: off
CLI_CASES: list[tuple[str, int, str]] = [
    # ---- align: values checked against the libraries' own lists, before any model loads
    ("align sft --lr-scheduler zigzag", 2, r"lr_scheduler must be one of linear, cosine, .*got 'zigzag'"),
    ("align dpo --loss-type magic", 2, r"loss_type 'magic' is not a DPO loss; known: sigmoid"),
    ("align dpo --loss-type sigmoid,magic --loss-weights 1,1", 2, r"loss_type 'magic' is not a DPO loss"),
    ("align dpo --loss-type sigmoid,sft --loss-weights 1", 2, r"loss_weights needs one weight per loss"),
    ("align dpo --loss-type sigmoid,sft --loss-weights a,b", 2, r"loss_weights must be numbers separated by commas"),
    ("align sft --report-to carrier-pigeon", 2, r"report_to must be one of none, all, .*"),
    ("align ppo --report-to tensorboard", 2, r"report_to: ppo writes metrics.jsonl and plots only"),
    ("align ppo --kl-estimator k9", 2, r"kl_estimator must be one of k1, k3, got 'k9'"),
    ("align ppo --rollout-backend sglang", 2, r"rollout_backend must be one of transformers, vllm"),
    ("align ppo --batch-size 6 --minibatch-size 4", 2, r"batch_size \(6\) must be a multiple of minibatch_size \(4\)"),
    ("align ppo --dual-clip 1", 2, r"dual_clip must be greater than 1"),
    ("align grpo --reward-model /no/such/run", 2, r"reward_model: /no/such/run is neither a reward run folder nor"),
    ("align grpo --rewards judge:1", 2, r"rewards: unknown reward 'judge'; known rewards: .*verifier"),
    ("align grpo --rewards http", 2, r"rewards uses http but reward_url is not set"),
    ("align grpo --batch-size 6 --num-generations 4", 2, r"must be a multiple of num_generations \(4\)"),
    ("align sft --max-steps 0", 2, r"max_steps must be a positive integer or -1"),
    ("align sft --lora-dropout 1", 2, r"lora_dropout must be in \[0, 1\)"),
    ("align sft --qlora --no-lora", 2, r"qlora needs lora"),
    ("align dpo --beta -1", 2, r"beta must be positive, got -1.0"),
    ("align sft --output-dir {a_file}/run", 2, r"output_dir .*a_file.txt is a file, not a folder"),
    ("align sft --dataset {latin1_jsonl}", 2, r"latin1.jsonl line 2, byte \d+: not UTF-8 text"),
    ("align dpo -c {latin1_yaml}", 2, r"latin1.yaml line 2, byte \d+: not UTF-8 text"),
    ("align dpo -c {tmp}/missing.yaml", 2, r"config file .*missing.yaml does not exist"),
    ("align dpo -c {broken_yaml}", 2, r"broken.yaml line \d+: not valid YAML"),
    ("align sft -c {typo_yaml}", 2, r"unknown field 'lerning_rate'; known: .*learning_rate"),
    ("align sft -c {grpo_yaml}", 2, r"recipe is for method 'grpo', not 'sft'"),
    ("align sft --dataset builtin:nope", 2, r"unknown built-in dataset 'nope'; known:"),
    ("align sft --dataset /no/file.jsonl", 2, r"dataset /no/file.jsonl does not exist"),
    ("align sft --dataset {csv}", 2, r"unsupported file type '.csv'"),
    ("align dpo --dataset {sft_rows}", 2, r"row 1: missing field 'chosen'"),
    ("align dpo --dataset {mixed_forms}", 2, r"mixed_forms.jsonl row 2: field 'prompt' is a conversation, but row 1 holds plain text"),
    ("align reward --dataset {mixed_row}", 2, r"mixed_row.jsonl row 1: field 'chosen' is a conversation but field 'prompt' is plain text"),
    ("align dpo --dataset {no_shared_start}", 2, r"no_shared_start.jsonl row 1: no field 'prompt', and fields 'chosen' and 'rejected' share no start"),
    ("align grpo --dataset {text_prompts}", 2, r"text_prompts.jsonl row 1: field 'prompt' is plain text, but the RL methods read only conversations"),
    ("align sft --dataset {text_messages}", 2, r"text_messages.jsonl row 1: field 'messages' is a string, not a conversation \(plain text goes in 'text'\)"),
    ("align compare {empty_dir} {empty_dir}", 2, r"empty is not a run folder \(run.json or config.yaml is missing\)"),
    ("align compare {empty_dir} --out runs.jpg", 2, r"--out runs.jpg must be a file name ending in .png"),
    # ---- quantize
    ("quantize smollm2 --type q9", 2, r"unknown quant type 'q9'; known: f32, f16"),
    ("quantize smollm2 --threads 0", 2, r"--threads must be at least 1, got 0"),
    ("quantize smollm2 --out x.txt", 2, r"--out x.txt must be a file name ending in .gguf"),
    ("quantize smollm2 --adapter /nowhere", 2, r"--adapter /nowhere is not a folder"),
    ("quantize smollm2 --report-against foo", 2, r"--report-against must be gguf or hf, got 'foo'"),
    ("quantize {empty_dir} --type q8_0", 2, r"is not a Hugging Face model folder: config.json is missing"),
    ("quantize {bad_config_dir} --type q8_0", 2, r"config.json is not valid JSON"),
    ("quantize {not_gguf} --type q8_0", 2, r"not_gguf.gguf is not a GGUF file \(bad magic bytes\)"),
    ("quantize smollm2 --type bnb-4bit", 2, r"type bnb-4bit needs a CUDA GPU"),
    ("quantize smollm2 --serve --port 70000", 2, r"--port must be between 1 and 65535, got 70000"),
    ("quantize ./nowhere --type q8_0", 2, r"model path ./nowhere does not exist"),
    # ---- generate / chat
    ("generate smollm2 hi --top-k -3", 2, r"--top-k must be a non-negative integer"),
    ("generate smollm2 hi --backend onnx", 2, r"unknown backend 'onnx'; known backends:"),
    ("generate /absent.gguf hi", 2, r"model path /absent.gguf does not exist"),
    ("generate {not_gguf} hi", 2, r"is not a GGUF file \(bad magic bytes\)"),
    ("generate smollm2 hi --stop \udcff", 2, r"--stop is not valid UTF-8 \(byte 0xff at character 1\)"),
    ("generate smollm2 caf\udce9", 2, r"PROMPT is not valid UTF-8 \(byte 0xe9 at character 4\)"),
    ("chat smollm2 --top-p 2", 2, r"--top-p must be between 0.0 and 1.0, got 2.0"),
    ("chat smollm2 --temperature -1", 2, r"--temperature must be between 0.0 and 100.0, got -1.0"),
    ("chat smollm2 --system be\udce9", 2, r"--system is not valid UTF-8 \(byte 0xe9 at character 3\)"),
    # ---- serve: every flag checked before a model loads or a port opens
    ("serve smollm2 --port 70000", 2, r"--port must be between 1 and 65535, got 70000"),
    ("serve smollm2 --port 0", 2, r"--port must be between 1 and 65535, got 0"),
    ("serve smollm2 --max-queue -1", 2, r"--max-queue must be 0 \(no waiting room\) or more, got -1"),
    ("serve smollm2 --n-parallel 0", 2, r"--n-parallel must be at least 1, got 0"),
    ("serve smollm2 --max-body-mb 0", 2, r"--max-body-mb must be a positive number of MiB, got 0.0"),
    ("serve smollm2 --allowed-hosts a,,b", 2, r"--allowed-hosts has an empty name: 'a,,b'"),
    ("serve smollm2 --model judge", 2, r"--model 'judge': expected NAME=REF"),
    ("serve smollm2 --adapter a=/nowhere", 2, r"--adapter a=/nowhere: /nowhere is not a folder"),
    ("serve smollm2 --quantize q4_k_m --backend transformers", 2, r"drop --backend transformers"),
]

USER = [{"role": "user", "content": "hi"}]
HTTP_CASES: list[tuple[str, object, int, str]] = [
    ("/v1/chat/completions", b"{not json", 400, r"not valid JSON"),
    ("/v1/chat/completions", {"messages": []}, 400, r"messages: List should have at least 1 item"),
    ("/v1/chat/completions", {"messages": USER, "temperature": -1}, 400, r"temperature must be"),
    ("/v1/chat/completions", {"messages": USER, "top_p": "NaN"}, 400, r"top_p must be a finite number"),
    ("/v1/chat/completions", {"messages": USER, "n": 0}, 400, r"n: Input should be greater than or equal to 1"),
    ("/v1/chat/completions", {"messages": USER, "bogus": 1}, 400, r"bogus is not supported by this server"),
    ("/v1/chat/completions", {"messages": USER, "functions": [{"name": "f"}]}, 400, r"functions is not supported by this server"),
    ("/v1/chat/completions", {"messages": USER, "audio": {"voice": "alloy"}}, 400, r"audio is not supported by this server"),
    ("/v1/chat/completions", {"messages": USER, "store": True}, 400, r"store=true is not supported: this server keeps no completions"),
    ("/v1/chat/completions", {"messages": USER, "model": "gpt-9"}, 404, r"model .gpt-9. is not served here; served models: mock"),
    ("/v1/chat/completions", {"messages": USER, "response_format": {"type": "json_schema"}}, 400, r"response_format.json_schema is required"),
    ("/v1/chat/completions", {"messages": USER, "response_format": {"type": "json_object"}}, 400, r"response_format is not supported by the mock backend"),
    ("/v1/chat/completions", {"messages": USER, "logit_bias": {"5": 1}}, 400, r"logit_bias is not supported by the mock"),
    ("/v1/chat/completions", {"messages": USER, "max_tokens": -5}, 400, r"max_tokens: Input should be greater than or equal to 0"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, 400, r"messages.0.role: Input should be .system."),
    ("/v1/chat/completions", {"messages": USER, "tool_choice": "required"}, 400, r"tool_choice needs tools"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x" * 50_000}]}, 400, r"prompt is 50022 characters but the model.s context window is 2048"),
    ("/v1/completions", {"prompt": "hi", "suffix": "x"}, 400, r"suffix \(fill-in-the-middle\) is not supported"),
    ("/v1/completions", {"prompt": "hi", "best_of": 3}, 400, r"best_of is not supported \(only best_of equal to n\)"),
    ("/v1/completions", {"prompt": "hi", "logprobs": 99}, 400, r"logprobs: Input should be less than or equal to 20"),
    ("/v1/completions", {"prompt": [[1, 2], "mixed"]}, 400, r"prompt.0: Input should be a valid string"),
    ("/v1/completions", {}, 400, r"prompt: Field required"),
    ("/v1/completions", {"prompt": ["a", "b", "c"], "n": 3}, 400, r"needs 9 generations at once but the server runs at most 8 \(--n-parallel\)"),
    ("/v1/chat/completions", {"messages": USER, "pad": "x" * 300_000}, 413, r"request body is over the server.s limit of 0.25 MiB \(--max-body-mb\)"),
]

# fmt: on

runner = CliRunner()


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    """The files and folders the cases name, made once."""
    tmp = tmp_path_factory.mktemp("bad-input")
    (tmp / "a_file.txt").write_text("not a folder")
    (tmp / "latin1.jsonl").write_bytes(
        b'{"prompt": "a", "completion": "b"}\n{"prompt": "caf\xe9", "completion": "b"}\n'
    )
    (tmp / "latin1.yaml").write_bytes(b"beta: 0.1\nnote: caf\xe9\n")
    (tmp / "broken.yaml").write_text("beta: [1\n")
    (tmp / "typo.yaml").write_text("lerning_rate: 1e-4\n")
    (tmp / "grpo.yaml").write_text("method: grpo\n")
    (tmp / "data.csv").write_text("prompt,completion\na,b\n")
    (tmp / "sft_rows.jsonl").write_text(json.dumps({"messages": USER}) + "\n")
    plain_pair = {"prompt": "Capital of France?", "chosen": "Paris.", "rejected": "Rome."}
    chat_pair = {"prompt": USER, "chosen": [{"role": "assistant", "content": "a"}], "rejected": [{"role": "assistant", "content": "b"}]}
    (tmp / "mixed_forms.jsonl").write_text(json.dumps(plain_pair) + "\n" + json.dumps(chat_pair) + "\n")
    (tmp / "mixed_row.jsonl").write_text(json.dumps({**chat_pair, "prompt": "hi"}) + "\n")
    (tmp / "no_shared_start.jsonl").write_text(json.dumps({"chosen": "Paris.", "rejected": "Rome."}) + "\n")
    (tmp / "text_prompts.jsonl").write_text(json.dumps({"prompt": "Capital of France?", "task": "capital", "answer": "Paris"}) + "\n")
    (tmp / "text_messages.jsonl").write_text(json.dumps({"messages": "hi"}) + "\n")
    (tmp / "empty").mkdir()
    (tmp / "bad_config").mkdir()
    (tmp / "bad_config" / "config.json").write_text("{")
    (tmp / "not_gguf.gguf").write_text("hello")
    names = {
        "tmp": "",
        "a_file": "a_file.txt",
        "latin1_jsonl": "latin1.jsonl",
        "latin1_yaml": "latin1.yaml",
        "broken_yaml": "broken.yaml",
        "typo_yaml": "typo.yaml",
        "grpo_yaml": "grpo.yaml",
        "csv": "data.csv",
        "sft_rows": "sft_rows.jsonl",
        "mixed_forms": "mixed_forms.jsonl",
        "mixed_row": "mixed_row.jsonl",
        "no_shared_start": "no_shared_start.jsonl",
        "text_prompts": "text_prompts.jsonl",
        "text_messages": "text_messages.jsonl",
        "empty_dir": "empty",
        "bad_config_dir": "bad_config",
        "not_gguf": "not_gguf.gguf",
    }
    return {key: str(tmp / name) if name else str(tmp) for key, name in names.items()}


@pytest.fixture
def nothing_heavy(monkeypatch):
    """Loading a model, training, quantizing or listening fails the case loudly instead."""
    import uvicorn

    import tandemlm.align.model as align_model
    from tandemlm.deploy import registry

    def refuse(*_: object, **__: object) -> None:
        raise AssertionError("a bad-input case got as far as loading or serving")

    monkeypatch.setattr(uvicorn, "run", refuse)
    monkeypatch.setattr(align_model, "load_model", refuse)
    registry._ensure_builtins()
    for name, backend in registry.backends().items():  # model paths and backends are checked before these
        monkeypatch.setitem(registry._BACKENDS, name, dataclasses.replace(backend, load=refuse))


@pytest.mark.parametrize(("args", "code", "pattern"), CLI_CASES, ids=[case[0][:60] for case in CLI_CASES])
def test_cli_bad_input_is_one_line(files, nothing_heavy, args, code, pattern):
    result = runner.invoke(app, shlex.split(args.format(**files)))
    lines = result.output.strip().splitlines()
    assert "Traceback" not in result.output and not isinstance(result.exception, AssertionError), result.output
    assert result.exit_code == code, result.output
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert re.search(pattern, lines[0]), lines[0]


@pytest.fixture(scope="module")
def server(serve):
    with serve(MockEngine(model_id="mock"), max_body_bytes=256 * 1024) as url:
        yield url.removesuffix("/v1")


@pytest.mark.parametrize(
    ("path", "body", "status", "pattern"), HTTP_CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(HTTP_CASES)]
)
def test_http_bad_input_is_one_openai_error_and_the_server_keeps_serving(server, path, body, status, pattern):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = httpx.post(f"{server}{path}", content=content, headers={"Content-Type": "application/json"}, timeout=30)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert "\n" not in error["message"] and re.search(pattern, error["message"]), error["message"]
    assert error["type"] in {"invalid_request_error", "not_found_error"}
    healthy = httpx.post(f"{server}/v1/chat/completions", json={"messages": USER, "max_tokens": 2}, timeout=30)
    assert healthy.status_code == 200


def test_the_corpus_covers_every_category_with_at_least_60_cases():
    assert len(CLI_CASES) + len(HTTP_CASES) >= 60
    assert {args.split()[0] for args, *_ in CLI_CASES} >= {"align", "quantize", "generate", "chat", "serve"}
