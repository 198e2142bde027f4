"""``tandem quantize``, ``tandem eval-quant`` and ``tandem serve --quantize`` as users run them."""

from __future__ import annotations

import json

import pytest
import torch
import uvicorn
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from tandemlm.cli.main import app
from tandemlm.quantize import pipeline

runner = CliRunner()
CHAT = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "temperature": 0}


@pytest.fixture
def session_cache(quant_cache, monkeypatch):
    """Commands use the test session's quantize cache (so results made by other tests are reused)."""
    monkeypatch.setattr(pipeline, "quantize_cache_root", lambda: quant_cache)
    return quant_cache


@pytest.fixture
def captured_server(monkeypatch):
    """Replaces uvicorn.run: the app is exercised in-process with one chat request, then returned."""
    seen = {}

    def run(app_, host, port, **_):
        seen["where"] = (host, port)
        with TestClient(app_, base_url=f"http://{host}:{port}") as client:  # a Host the server accepts
            seen["reply"] = client.post("/v1/chat/completions", json=CHAT, headers=seen.get("headers", {}))

    monkeypatch.setattr(uvicorn, "run", run)
    return seen


def test_list_shows_types_with_bits_per_weight():
    result = runner.invoke(app, ["quantize", "--list"])
    assert result.exit_code == 0, result.output
    for label, bits in (("Q4_K_M", "4.50"), ("Q8_0", "8.50"), ("Q6_K", "6.56"), ("F16", "16.00"), ("bnb-4bit", "4.50")):
        assert label in result.output and bits in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["quantize"], "error: missing MODEL"),
        (["quantize", "smollm2", "--type", "q9"], "error: unknown quant type 'q9'; known: f32, f16"),
        (["quantize", "./nowhere", "--type", "q8_0"], "error: model path ./nowhere does not exist"),
    ],
)
def test_bad_arguments_give_one_line_errors(args, message):
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    assert message in result.output and "Traceback" not in result.output


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without a GPU")
def test_bitsandbytes_types_need_a_gpu(tiny_llama_dir):
    result = runner.invoke(app, ["quantize", str(tiny_llama_dir), "--type", "bnb-4bit", "--serve"])
    assert result.exit_code == 2
    assert "error: type bnb-4bit needs a CUDA GPU (bitsandbytes)" in result.output


def test_quantize_with_report_prints_a_table_and_writes_json(quantized, session_cache, tiny_llama_dir, tmp_path):
    quantized("llama", "q8_0")
    out = tmp_path / "tiny-q8.gguf"
    result = runner.invoke(app, ["quantize", str(tiny_llama_dir), "--type", "Q8_0", "--out", str(out), "--report", "--no-speed"])
    assert result.exit_code == 0, result.output
    assert str(out) in result.output and "reusing verified Q8_0" in result.output
    assert "perplexity" in result.output and "same top token" in result.output
    report = json.loads(out.with_suffix(".report.json").read_text())
    assert report["original"]["name"] == "F16" and report["quantized"]["name"] == "Q8_0"
    assert report["size_ratio"] < 0.6 and report["same_top_rate"] > 0.5 and report["greedy_prompts"] == 8
    assert report["scored_tokens"] > 8000 and "macbeth" in report["text"]  # the default: 8192 tokens of the built-in text
    assert report["card"]["type"] == "Q8_0" and report["card"]["pp_tok_s"] is None  # --no-speed


def test_eval_quant_compares_the_hf_original_with_a_gguf(quantized, tiny_llama_dir, tmp_path):
    q8 = quantized("llama", "q8_0")
    json_path = tmp_path / "eval.json"
    args = ["eval-quant", str(tiny_llama_dir), str(q8.path), "--json", str(json_path), "--prompts", "2", "--tokens", "300", "--window", "128", "--no-speed"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    report = json.loads(json_path.read_text())
    assert report["original"]["kind"] == "hf" and report["quantized"]["kind"] == "gguf"
    assert report["window"] == 128 and 290 <= report["scored_tokens"] <= 300 and report["greedy_prompts"] == 2
    # transformers' template and tokenizer vs the GGUF's metadata and llama.cpp's tokenizer: same prompts, same ids
    assert report["template_identical"] and report["prompt_tokens_identical"]
    assert report["same_top_rate"] > 0.9 and abs(report["perplexity_change"]) < 0.01
    assert report["quantized"]["bits_per_weight"] < report["original"]["bits_per_weight"]
    assert report["card"]["type"] == "Q8_0" and report["original"]["qtype"] == "HF" and report["card"]["tg_tok_s"] is None


def test_serve_quantize_serves_the_verified_gguf(quantized, session_cache, tiny_llama_dir, captured_server):
    quantized("llama", "q4_k_m")
    result = runner.invoke(app, ["serve", str(tiny_llama_dir), "--quantize", "Q4_K_M", "--port", "8123", "--n-parallel", "2"])
    assert result.exit_code == 0, result.output
    assert "serving the verified Q4_K_M GGUF" in result.output and "(llama.cpp)" in result.output
    assert captured_server["where"] == ("127.0.0.1", 8123)
    reply = captured_server["reply"]
    assert reply.status_code == 200, reply.text
    assert reply.json()["usage"]["completion_tokens"] >= 1


def test_quantize_then_serve_in_one_command(quantized, session_cache, tiny_llama_dir, tmp_path, captured_server, monkeypatch):
    import tandemlm.cli.quantize as cli_quantize

    quantized("llama", "q8_0")
    out = tmp_path / "served.gguf"
    captured_server["headers"] = {"Authorization": "Bearer sekrit"}
    loads = []
    load_gguf = cli_quantize._load_gguf
    monkeypatch.setattr(cli_quantize, "_load_gguf", lambda path, options: loads.append(options) or load_gguf(path, options))
    args = ["quantize", str(tiny_llama_dir), "--type", "q8_0", "--out", str(out), "--serve", "--api-key", "sekrit", "--port", "8124"]
    result = runner.invoke(app, [*args, "--n-gpu-layers", "0"])
    assert result.exit_code == 0, result.output
    assert loads[0].n_gpu_layers == 0
    assert out.is_file() and captured_server["where"] == ("127.0.0.1", 8124)
    assert captured_server["reply"].status_code == 200, captured_server["reply"].text


def test_serve_quantize_refuses_a_mismatched_backend(tiny_llama_dir):
    result = runner.invoke(app, ["serve", str(tiny_llama_dir), "--quantize", "q4_k_m", "--backend", "transformers"])
    assert result.exit_code == 2
    assert "makes a GGUF file, which the llama.cpp backend serves" in result.output


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_bitsandbytes_4bit_load_serves_on_gpu(tiny_llama_dir, captured_server):
    pytest.importorskip("bitsandbytes")
    result = runner.invoke(app, ["serve", str(tiny_llama_dir), "--quantize", "bnb-4bit"])
    assert result.exit_code == 0, result.output
    assert captured_server["reply"].status_code == 200, captured_server["reply"].text
