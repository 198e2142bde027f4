"""Loading the model to train: base weights, tokenizer, LoRA/QLoRA settings, CPU threads.

A ``model`` reference may be a built-in name, an HF folder, a hub id, or a finished run folder
(its merged or full weights), so methods chain: ``sft`` then ``dpo --model runs/sft-...``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tandemlm.align.config import AlignConfig
from tandemlm.align.errors import ConfigError
from tandemlm.align.run_folder import is_run_folder, read_run_folder
from tandemlm.storage.pickle_guard import refused_pickle

if TYPE_CHECKING:
    from peft import LoraConfig
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from tandemlm.hardware import Precision


def set_threads(threads: int) -> None:
    """Sets torch's CPU thread count (0 keeps torch's default).

    On a shared 2-core machine one thread is several times faster than two: torch's worker
    threads spin-wait on each other whenever another process holds a core.
    """
    if threads > 0:
        import torch

        torch.set_num_threads(threads)


def base_folder(ref: str, trust_remote_code: bool = False) -> Path:
    """A local HF folder for ``ref``: a run's trained weights, a built-in, a folder or a hub id."""
    from tandemlm.models.resolve import resolve_model

    path = Path(ref).expanduser()
    if is_run_folder(path):
        return read_run_folder(path).model_folder()
    return resolve_model(ref, trust_remote_code=trust_remote_code).hf_folder()


def load_tokenizer(folder: str | Path, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """The folder's tokenizer, with a pad token (batches need one; EOS serves, as TRL does)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not tokenizer.chat_template:
        raise ConfigError(f"model {folder} has no chat template; the align methods train on conversations")
    return tokenizer


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silences transformers below errors for a block (load reports that would only confuse)."""
    from transformers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(level)


def load_model(folder: str | Path, config: AlignConfig, head: str = "causal") -> PreTrainedModel:
    """The base model for training: ``head`` is ``causal`` (a policy) or ``score`` (a reward model)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    kwargs: dict[str, Any] = {
        "dtype": torch.bfloat16 if config.bf16 else torch.float32,
        "trust_remote_code": config.trust_remote_code,
    }
    if config.qlora:
        from accelerate import PartialState

        kwargs["quantization_config"] = quantization_config()
        kwargs["device_map"] = {"": PartialState().local_process_index}  # one full copy per GPU process
    if head == "score":
        kwargs["num_labels"] = 1  # Bradley-Terry: one scalar per sequence
    auto = AutoModelForSequenceClassification if head == "score" else AutoModelForCausalLM
    with refused_pickle(folder):  # a pickle-only checkpoint torch refuses: one line, not 60
        model = auto.from_pretrained(folder, **kwargs)
    if config.qlora:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=bool(config.gradient_checkpointing))
    return model


def inference_load_kwargs(precision: Precision, four_bit: bool = False) -> dict[str, Any]:
    """``from_pretrained`` settings to run a model for inference (eval, scoring) at ``precision``.

    ``four_bit`` (the base of a QLoRA run) loads it in 4-bit again on a GPU, so a run that only fit
    the GPU in 4-bit can be evaluated there; bitsandbytes needs CUDA, so on CPU it loads at the
    precision's dtype instead.
    """
    kwargs: dict[str, Any] = {
        "dtype": precision.torch_dtype(),
        "device_map": precision.device,
        "attn_implementation": precision.attention,
    }
    if four_bit and precision.device.startswith("cuda"):
        kwargs["quantization_config"] = quantization_config()
    return kwargs


def quantization_config() -> Any:
    """NF4 4-bit with double quantisation and bf16 compute: the QLoRA paper's settings."""
    import torch
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )


def lora_config(config: AlignConfig, model: PreTrainedModel, task_type: str = "CAUSAL_LM") -> LoraConfig | None:
    """LoRA settings from the config (None when training all weights).

    ``SEQ_CLS`` makes PEFT train the reward model's new score head in full beside the adapters.
    """
    if not config.uses_lora:
        return None
    from peft import LoraConfig

    target: str | list[str] = config.lora_target
    if target != "all-linear":
        target = [name.strip() for name in target.split(",") if name.strip()]
    layers = None
    if config.lora_layers is not None:
        total = int(model.config.get_text_config().num_hidden_layers)
        if config.lora_layers > total:
            raise ConfigError(f"lora_layers is {config.lora_layers} but the model has {total} layers")
        layers = list(range(total - config.lora_layers, total))
        if target == "all-linear":  # PEFT wants names, not "all-linear", with layers_to_transform
            target = _block_linear_names(model)
    return LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=target,
        layers_to_transform=layers,
        task_type=task_type,
    )


def _block_linear_names(model: Any) -> list[str]:
    """Names (q_proj, down_proj, ...) of the linear layers inside the transformer blocks."""
    import torch

    return sorted(
        {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, torch.nn.Linear) and ".layers." in name}
    )

