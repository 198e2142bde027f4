"""eval, reward scoring, merge and the quantize HF scorer load for inference on this machine's device.

All go through ``hardware.inference_precision``: fp32 on CPU, cuda + bf16/fp16 on a GPU. The CPU
side runs here; the GPU side carries ``gpu`` and runs in ``scripts/gpu_check.sh``.
"""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from tandemlm.cli.main import app

runner = CliRunner()
cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU side")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cpu_only
def test_eval_device_flag_is_one_line_and_fails_before_any_model_loads(reward_run):
    result = runner.invoke(app, ["align", "eval", str(reward_run.dir), "--dataset", "builtin:prefs_test", "--device", "cuda"])
    assert result.exit_code == 2
    assert result.output.strip() == "error: --device cuda: no CUDA GPU is available here; use --device cpu or auto"
    result = runner.invoke(app, ["align", "eval", str(reward_run.dir), "--dataset", "builtin:prefs_test", "--device", "tpu"])
    assert result.exit_code == 2 and result.output.strip() == "error: --device 'tpu': use one of auto, cpu, cuda"
    assert not (reward_run.dir / "eval.json").exists() or "pairs" in (reward_run.dir / "eval.json").read_text()


@cpu_only
def test_reward_model_loads_fp32_on_cpu_for_scoring_and_keeps_a_trainers_dtype(reward_run):
    from tandemlm.align.rewards import load_reward_model

    model, _ = load_reward_model(reward_run.dir)
    assert model.dtype == torch.float32 and model.device.type == "cpu"
    model, _ = load_reward_model(reward_run.dir, torch.bfloat16)  # GRPO / PPO pass their training dtype
    assert model.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="--device cuda"):
        load_reward_model(reward_run.dir, device="cuda")


@cpu_only
def test_merge_device_on_cpu(reward_run, tmp_path):
    from tandemlm.align.merge import _merge_device, merge_run

    assert _merge_device("auto", reward_run.base_model) == "cpu"
    with pytest.raises(ValueError, match="--device cuda"):
        merge_run(reward_run.dir, tmp_path / "merged", device="cuda")
    assert not (tmp_path / "merged").exists()


@cpu_only
def test_quantize_hf_scorer_is_fp32_on_cpu(tiny_llama_dir):
    from tandemlm.quantize.logit_scorers import HFScorer

    scorer = HFScorer(tiny_llama_dir)
    assert scorer.model.dtype == torch.float32 and scorer.device.type == "cpu"


@pytest.mark.gpu
@needs_cuda
def test_reward_model_and_hf_scorer_run_16_bit_on_the_gpu(reward_run, tiny_llama_dir):
    from tandemlm.align.rewards import load_reward_model, score_conversations
    from tandemlm.quantize.logit_scorers import HFScorer

    model, tokenizer = load_reward_model(reward_run.dir)
    assert model.device.type == "cuda" and model.dtype in (torch.bfloat16, torch.float16)
    scores = score_conversations(model, tokenizer, [[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]])
    assert len(scores) == 1 and scores[0] == scores[0]  # not NaN
    scorer = HFScorer(tiny_llama_dir)
    assert scorer.device.type == "cuda" and scorer.model.dtype in (torch.bfloat16, torch.float16)
    assert scorer.logits(scorer.tokenize("The capital of France is")).dtype.name == "float32"


@pytest.mark.gpu
@needs_cuda
def test_eval_on_the_gpu_and_merge_there_matches_the_cpu_merge(reward_run, tmp_path):
    from safetensors.torch import load_file

    from tandemlm.align.evaluate import EvalOptions, evaluate_run
    from tandemlm.align.merge import merge_run

    report = evaluate_run(reward_run.dir, EvalOptions(datasets=["builtin:prefs_test"], prompts=4, device="cuda"))
    assert report["pairs"]["n"] == 4
    on_gpu = load_file(next(merge_run(reward_run.dir, tmp_path / "gpu", device="cuda").glob("*.safetensors")))
    on_cpu = load_file(next(merge_run(reward_run.dir, tmp_path / "cpu", device="cpu").glob("*.safetensors")))
    assert on_gpu.keys() == on_cpu.keys()
    for name, tensor in on_cpu.items():
        torch.testing.assert_close(on_gpu[name], tensor, rtol=1e-5, atol=1e-6)


def test_a_qlora_base_loads_in_4bit_again_for_inference_only_on_a_gpu(tmp_path):
    from tandemlm.align.model import inference_load_kwargs
    from tandemlm.align.run_folder import RunFolder
    from tandemlm.hardware import Precision

    on_gpu = inference_load_kwargs(Precision("cuda", "bfloat16", "sdpa"), four_bit=True)
    config = on_gpu["quantization_config"]
    assert config.load_in_4bit and config.bnb_4bit_quant_type == "nf4"
    assert (on_gpu["dtype"], on_gpu["device_map"]) == (torch.bfloat16, "cuda")
    assert "quantization_config" not in inference_load_kwargs(Precision("cuda", "bfloat16", "sdpa"), four_bit=False)
    on_cpu = inference_load_kwargs(Precision("cpu", "float32", "sdpa"), four_bit=True)  # bitsandbytes needs CUDA
    assert "quantization_config" not in on_cpu and on_cpu["dtype"] == torch.float32

    run = RunFolder(tmp_path)
    assert not run.trained_in_4bit  # no config.yaml
    (tmp_path / "config.yaml").write_text("method: dpo\nqlora: true\n")
    assert run.trained_in_4bit
    (tmp_path / "config.yaml").write_text("method: dpo\nqlora: false\n")
    assert not run.trained_in_4bit


@pytest.mark.gpu
@needs_cuda
def test_a_qlora_reward_run_is_scored_in_4bit_on_the_gpu(reward_run, tmp_path):
    import shutil

    pytest.importorskip("bitsandbytes", reason="QLoRA loads need bitsandbytes (scripts/setup.sh --gpu)")

    import yaml

    from tandemlm.align.rewards import load_reward_model, score_conversations

    qlora_run = tmp_path / "qlora-reward"
    shutil.copytree(reward_run.dir, qlora_run)
    config = yaml.safe_load((qlora_run / "config.yaml").read_text())
    (qlora_run / "config.yaml").write_text(yaml.safe_dump({**config, "qlora": True}))
    model, tokenizer = load_reward_model(qlora_run)
    assert getattr(model.base_model.model, "is_loaded_in_4bit", False)
    scores = score_conversations(model, tokenizer, [[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]])
    assert len(scores) == 1 and scores[0] == scores[0]


@pytest.mark.gpu
@needs_cuda
def test_a_qlora_dpo_run_trains_and_evaluates_on_the_gpu_that_trained_it(tiny_llama, tmp_path):
    """recipes/dpo.yaml's one-GPU shape: a 4-bit base with a LoRA adapter, then eval on the same GPU in 4-bit."""
    pytest.importorskip("bitsandbytes")
    from conftest import one_batch, state_dict_of, train_tiny

    from tandemlm.align.evaluate import EvalOptions, evaluate_run

    data = one_batch("builtin:prefs_train", 2, tmp_path / "data")
    run = train_tiny("dpo", tiny_llama, tmp_path / "run", dataset=data, lora=True, qlora=True, max_steps=2)
    assert run.config.qlora and run.trained_in_4bit
    assert any("lora_B" in name and t.abs().sum() > 0 for name, t in state_dict_of(run.final).items())
    report = evaluate_run(run.dir, EvalOptions(datasets=["builtin:prefs_test"], prompts=2, device="cuda"))
    assert report["pairs"]["n"] == 2
