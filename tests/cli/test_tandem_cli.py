"""The ``tandem`` command line, run as a user runs it."""

from __future__ import annotations

import subprocess
import sys

import pytest
from typer.testing import CliRunner

from tandemlm.cli.main import app

runner = CliRunner()


def tandem(*args: str, stdin: str = "", timeout: int = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tandemlm.cli.main", *args], input=stdin, capture_output=True, text=True, timeout=timeout
    )


def test_chat_with_the_builtin_model_streams_sensible_multi_turn_answers():
    script = "\n".join(
        [
            "What is the capital of France? Answer in one short sentence.",
            "What is 2+2?",
            "/reset",
            "/system You are a pirate.",
            "/exit",
            "this line is never read",
        ]
    )
    result = tandem("chat", "smollm2", "--temperature", "0", "--max-tokens", "32", stdin=script)
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout
    second_answer = result.stdout.split("Paris", 1)[1].strip(" .\n")
    assert second_answer  # the second turn (with the first in its history) got a reply too
    assert "conversation cleared" in result.stderr
    assert "system prompt set" in result.stderr
    assert "never read" not in result.stdout
    assert "tokens/s" in result.stderr


def test_generate_raw_completion():
    result = tandem("generate", "smollm2", "The capital of France is", "--temperature", "0", "--max-tokens", "4")
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--temperature", "nan"], "--temperature must be a finite number"),
        (["--top-p", "2"], "--top-p must be between 0"),
        (["--max-tokens", "0"], "--max-tokens must be a positive integer"),
        (["--top-k", "-3"], "--top-k must be a non-negative integer"),
    ],
)
def test_bad_sampling_flags_give_one_line_errors(flags, message):
    result = runner.invoke(app, ["generate", "smollm2", "hi", *flags])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines == [f"error: {message}" + lines[0].split(message, 1)[1]]


def test_missing_model_path_is_one_line(tmp_path):
    result = runner.invoke(app, ["generate", str(tmp_path / "absent.gguf"), "hi"])
    assert result.exit_code == 2
    assert result.output.strip() == f"error: model path {tmp_path / 'absent.gguf'} does not exist"


def test_unknown_backend_lists_known_ones():
    result = runner.invoke(app, ["generate", "smollm2", "hi", "--backend", "onnx"])
    assert result.exit_code == 2
    assert "unknown backend 'onnx'; known backends:" in result.output
    assert "llama.cpp" in result.output


def test_env_reports_backends_and_the_builtin_model():
    from tandemlm.models.builtin import builtin_gguf

    result = runner.invoke(app, ["env"], env={"COLUMNS": "400"})  # wide enough that rich cuts no path short
    assert result.exit_code == 0, result.output
    assert "llama.cpp" in result.output and "transformers" in result.output
    assert not [line for line in result.output.splitlines() if line.startswith("│ mock ")]  # test-only backend
    rows = [line.strip("│ ").split() for line in result.output.splitlines() if line.startswith("│ smollm2 ")]
    assert rows == [["smollm2", "│", str(builtin_gguf("smollm2"))]]


def test_env_prints_the_inference_device_dtype_and_attention():
    from tandemlm.hardware import inference_precision

    result = runner.invoke(app, ["env"])
    chosen = inference_precision()
    assert f"inference: {chosen.device}, {chosen.dtype}, attention {chosen.attention}" in " ".join(result.output.split())


@pytest.fixture
def uvicorn_calls(monkeypatch):
    """``tandem serve`` on a mock engine that records ``uvicorn.run`` instead of listening."""
    import uvicorn

    import tandemlm.cli.main as cli_main
    from tandemlm.deploy.mock_engine import MockEngine

    calls: list[dict] = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: calls.append({"app": app, **kwargs}))
    monkeypatch.setattr(cli_main, "_load", lambda model, options, **extra: MockEngine(model_id=model))
    return calls


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--port", "70000"], "--port must be between 1 and 65535, got 70000"),
        (["--port", "0"], "--port must be between 1 and 65535, got 0"),
        (["--max-queue", "-1"], "--max-queue must be 0 (no waiting room) or more, got -1"),
        (["--n-parallel", "0"], "--n-parallel must be at least 1, got 0"),
        (["--max-body-mb", "0"], "--max-body-mb must be a positive number of MiB, got 0.0"),
        (["--allowed-hosts", "a,,b"], "--allowed-hosts has an empty name: 'a,,b'"),
    ],
)
def test_bad_serve_flags_are_one_line_errors_before_anything_loads(uvicorn_calls, flags, message):
    result = runner.invoke(app, ["serve", "smollm2", *flags])
    assert (result.exit_code, result.output.strip()) == (2, f"error: {message}")
    assert not uvicorn_calls


def test_quantize_serve_checks_its_port_before_quantizing(uvicorn_calls, tmp_path):
    result = runner.invoke(app, ["quantize", str(tmp_path / "absent"), "--serve", "--port", "70000"])
    assert (result.exit_code, result.output.strip()) == (2, "error: --port must be between 1 and 65535, got 70000")


def test_serve_serves_extra_models_by_name(uvicorn_calls):
    result = runner.invoke(app, ["serve", "smollm2", "--served-name", "base", "--model", "judge=other.gguf", "--model", "x=y"])
    assert result.exit_code == 0, result.output
    [call] = uvicorn_calls
    engines = call["app"].state.context.engines
    assert list(engines) == ["base", "judge", "x"] and engines["judge"].info.model_id == "other.gguf"
    for bad, message in ((["--model", "judge"], "expected NAME=REF"), (["--model", "a=b", "--model", "a=c"], "given twice")):
        result = runner.invoke(app, ["serve", "smollm2", *bad])
        assert result.exit_code != 0 and message in result.output


def test_serve_passes_port_queue_and_hosts_through(uvicorn_calls):
    flags = ["--port", "8123", "--max-queue", "0", "--max-body-mb", "0.5", "--allowed-hosts", "box.lan"]
    result = runner.invoke(app, ["serve", "smollm2", "--host", "0.0.0.0", *flags])
    assert result.exit_code == 0, result.output
    [call] = uvicorn_calls
    assert (call["host"], call["port"], call["app"].state.admission.max_queue) == ("0.0.0.0", 8123, 0)
    assert "box.lan" in result.output and "--allowed-hosts" in result.output  # a wildcard bind names the Host names it answers


def test_ui_passes_llamacpp_offload_to_the_engine_pool(monkeypatch):
    import tandemlm.ui.app as ui_app

    seen = []
    monkeypatch.setattr(ui_app, "launch", seen.append)
    result = runner.invoke(app, ["ui", "--n-gpu-layers", "12", "--n-threads", "2"])
    assert result.exit_code == 0, result.output
    assert (seen[0].n_gpu_layers, seen[0].n_threads) == (12, 2)
