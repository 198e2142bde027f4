"""Configs: precedence defaults < preset < YAML < flags, errors that name the field, hardware auto-fill."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tandemlm.align.config import build_config, resolve_auto
from tandemlm.align.dpo import DPORunConfig
from tandemlm.align.errors import ConfigError
from tandemlm.align.ppo.group_config import GRPORunConfig
from tandemlm.align.sft import SFTRunConfig


def test_precedence_defaults_preset_yaml_flags(tmp_path):
    recipe = tmp_path / "dpo.yaml"
    recipe.write_text("method: dpo\nbeta: 0.3\nmax_steps: 7\nlearning_rate: 1e-4\n")
    config = build_config(DPORunConfig, recipe, preset="cpu-demo", overrides={"max_steps": 9, "beta": None})
    assert config.max_steps == 9  # flag beats YAML
    assert config.beta == 0.3  # YAML beats preset; an unset flag (None) changes nothing
    assert config.lora_layers == 8  # preset beats default
    assert config.precompute_ref_log_probs is False and config.seed == 0  # defaults
    assert isinstance(config.learning_rate, float) and config.learning_rate == 1e-4


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"max_steps": 0}, "max_steps must be a positive integer or -1"),
        ({"batch_size": "4"}, "batch_size must be an integer"),
        ({"learning_rate": -1.0}, "learning_rate must be positive"),
        ({"lora": "yes"}, "lora must be true or false or null"),
        ({"beta": 0}, "beta must be positive"),
        ({"lora_layers": 0}, "lora_layers must be at least 1"),
    ],
)
def test_bad_values_name_the_field(values, message):
    with pytest.raises(ConfigError, match=message):
        build_config(DPORunConfig, overrides=values)


def test_yaml_errors_name_file_and_key(tmp_path):
    bad_key = tmp_path / "a.yaml"
    bad_key.write_text("lerning_rate: 1e-4\n")
    with pytest.raises(ConfigError, match=r"a\.yaml: unknown field 'lerning_rate'; known: .*learning_rate"):
        build_config(SFTRunConfig, bad_key)
    wrong_method = tmp_path / "b.yaml"
    wrong_method.write_text("method: grpo\n")
    with pytest.raises(ConfigError, match="recipe is for method 'grpo', not 'sft'"):
        build_config(SFTRunConfig, wrong_method)
    broken = tmp_path / "c.yaml"
    broken.write_text("beta: [1\n")
    with pytest.raises(ConfigError, match=r"c\.yaml line \d+: not valid YAML"):
        build_config(DPORunConfig, broken)
    with pytest.raises(KeyError, match="unknown preset 'gpu-demo' for dpo; known presets: cpu-demo"):
        build_config(DPORunConfig, preset="gpu-demo")


def test_grpo_checks_group_size_and_rewards():
    with pytest.raises(ConfigError, match=r"batch_size \(6\) must be a multiple of num_generations \(4\)"):
        build_config(GRPORunConfig, overrides={"batch_size": 6, "num_generations": 4})
    with pytest.raises(ConfigError, match="rewards: unknown reward 'judge'; known rewards: http, reward_model, verifier"):
        build_config(GRPORunConfig, overrides={"rewards": "judge:1"})
    with pytest.raises(ConfigError, match=r"reward_model .* is not set"):
        build_config(GRPORunConfig, overrides={"rewards": "verifier:1,reward_model:0.5"})


def test_auto_fields_follow_the_hardware():
    gpu = resolve_auto(DPORunConfig(), cuda=True)
    assert gpu.lora and gpu.gradient_checkpointing  # one-GPU memory discipline by default
    cpu = resolve_auto(DPORunConfig(), cuda=False)
    assert cpu.lora is False and cpu.gradient_checkpointing is False and cpu.bf16 is False
    assert resolve_auto(DPORunConfig(lora=True), cuda=False).lora is True  # explicit choices stay
    with pytest.raises(ConfigError, match="qlora needs a CUDA GPU"):
        resolve_auto(DPORunConfig(qlora=True), cuda=False)


def test_every_field_has_help():
    import dataclasses

    from tandemlm.align.registry import methods

    for method in methods().values():
        for f in dataclasses.fields(method.config_cls):
            assert f.metadata.get("help"), f"{method.name}.{f.name} has no help string"


def test_recipes_load_as_their_method():
    from pathlib import Path

    from tandemlm.align.registry import get_method

    recipes = sorted((Path(__file__).resolve().parents[2] / "recipes").glob("*.yaml"))
    assert {p.stem for p in recipes} >= {"sft", "reward", "dpo", "kto", "ppo", "grpo", "dapo", "gspo", "dcpo"}
    for recipe in recipes:
        config = build_config(get_method(recipe.stem).config_cls, recipe)
        assert config.lora is True and config.model  # one-GPU recipes train adapters


@pytest.mark.gpu
def test_qlora_loads_4bit_under_lora(tiny_llama):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    pytest.importorskip("bitsandbytes")
    from tandemlm.align.model import load_model

    config = resolve_auto(DPORunConfig(model=str(tiny_llama), qlora=True))
    model = load_model(tiny_llama, config)
    assert getattr(model, "is_loaded_in_4bit", False)


# ---- values with a closed set of choices, checked against the libraries' own lists ----------------


@pytest.mark.parametrize(
    ("cls", "values", "message"),
    [
        (SFTRunConfig, {"lr_scheduler": "zigzag"}, r"lr_scheduler must be one of linear, cosine, .*got 'zigzag'"),
        (SFTRunConfig, {"report_to": "carrier-pigeon"}, r"report_to must be one of none, all, .*wandb.*got 'carrier-pigeon'"),
        (DPORunConfig, {"loss_type": "magic"}, r"loss_type 'magic' is not a DPO loss; known: sigmoid, .*ipo"),
        (DPORunConfig, {"loss_type": "sigmoid,magic", "loss_weights": "1,1"}, r"loss_type 'magic' is not a DPO loss"),
        (DPORunConfig, {"loss_type": " , "}, "loss_type must name at least one loss"),
        (GRPORunConfig, {"reward_model": "/no/such/reward-run"}, r"reward_model: /no/such/reward-run is neither"),
    ],
)
def test_closed_choices_are_checked_when_the_config_is_built(cls, values, message):
    with pytest.raises(ConfigError, match=message):
        build_config(cls, overrides=values)


def test_library_choices_are_accepted():
    # Names that only the libraries list (no hand-kept copy here): transformers' schedules, TRL's DPO losses.
    assert build_config(SFTRunConfig, overrides={"lr_scheduler": "warmup_stable_decay"}).lr_scheduler == "warmup_stable_decay"
    assert build_config(DPORunConfig, overrides={"loss_type": "apo_zero,sft", "loss_weights": "1,1"}).loss_types == ["apo_zero", "sft"]


def test_yaml_choices_and_bytes_are_checked(tmp_path):
    recipe = tmp_path / "sft.yaml"
    recipe.write_text("method: sft\nlr_scheduler: zigzag\n")
    with pytest.raises(ConfigError, match=r"lr_scheduler must be one of .*got 'zigzag'"):
        build_config(SFTRunConfig, recipe)
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes(b"method: sft\nmodel: caf\xe9\n")
    with pytest.raises(ConfigError, match=r"latin1\.yaml line 2, byte 22: not UTF-8 text"):
        build_config(SFTRunConfig, latin1)


def test_output_dir_under_a_file_is_refused(tmp_path):
    blocker = tmp_path / "file.txt"
    blocker.write_text("not a folder")
    with pytest.raises(ConfigError, match=rf"output_dir {blocker}/run: {blocker} is a file, not a folder"):
        build_config(SFTRunConfig, overrides={"output_dir": str(blocker / "run")})


def _refusal_as(uid: int | None, output_dir: Path) -> str:
    """The ConfigError message for ``output_dir``, checked in a forked child running as ``uid`` (None: as we are).

    A fork, not a new interpreter: the unprivileged user may not be able to read the Python install (root's home).
    """
    build_config(SFTRunConfig, overrides={"output_dir": str(output_dir.parent.parent / "warm")})  # imports done here
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: drop root, check, report, exit without running the parent's clean-ups
        message = "no error"
        try:
            if uid is not None:
                os.setgid(uid)
                os.setuid(uid)
            build_config(SFTRunConfig, overrides={"output_dir": str(output_dir)})
        except ConfigError as exc:
            message = str(exc)
        except BaseException as exc:  # noqa: BLE001 - reported to the parent, which fails the test
            message = f"unexpected {type(exc).__name__}: {exc}"
        os.write(write, message.encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        message = pipe.read()
    os.waitpid(pid, 0)
    return message


def test_output_dir_without_write_permission_is_refused():
    """Root writes through 0o500, so as root (CI runs as root) the check runs as the unprivileged ``nobody``."""
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="tandem-locked-"))  # not under root's 0o700 pytest folder
    try:
        folder.chmod(0o755)
        locked = folder / "locked"
        locked.mkdir(mode=0o500)
        as_root = os.geteuid() == 0
        if as_root:
            os.chown(locked, 65534, 65534)  # nobody's own folder, and still 0o500: its owner cannot write either
        message = _refusal_as(65534 if as_root else None, locked / "run")
        assert message == f"output_dir {locked}/run: cannot write to {locked} (read-only or no permission)"
    finally:
        shutil.rmtree(folder, ignore_errors=True)
