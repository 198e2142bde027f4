"""Hugging Face ``transformers`` models, with concurrent requests batched into one forward pass.

A scheduler thread gathers the requests that are waiting, left-pads them into one batch and
decodes them together step by step with a shared KV cache. Each row keeps its own sampling
settings (transformers' logits processors), its own seeded generator and its own JSON grammar
(``hf_sampling``), so a request gives the same tokens alone or in a batch. Requests that arrive
mid-batch join the next batch.
"""

from __future__ import annotations

import importlib.util
import json
import queue
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from tandemlm.deploy.engine import BaseEngine
from tandemlm.deploy.registry import register_backend
from tandemlm.deploy.scheduling import WorkQueue, drain_tokens
from tandemlm.deploy.types import EngineInfo, GeneratedToken, SamplingParams
from tandemlm.errors import EngineError
from tandemlm.hardware import inference_precision
from tandemlm.models.adapter_files import adapter_weights
from tandemlm.models.chat_template import Message, render_with_tokenizer, tokenizer_special_tokens, tokenizer_template
from tandemlm.models.resolve import ModelSource
from tandemlm.models.stops import stop_ids


@dataclass
class _Row:
    prompt: list[int]
    params: SamplingParams
    out: queue.Queue[Any] = field(default_factory=queue.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    generated: list[int] = field(default_factory=list)
    emitted_text: str = ""
    done: bool = False
    grammar: Any = None  # hf_sampling.GrammarMask for a constrained request, built before it queues


class HFEngine(BaseEngine):
    """A transformers causal LM with batched decoding of concurrent requests."""

    features = frozenset(
        {
            "min_p",
            "presence_penalty",
            "frequency_penalty",
            "logit_bias",
            "logprobs",
            "top_logprobs",
            "response_format",
            "adapter",
        }
    )

    def __init__(
        self,
        folder: str,
        model_id: str,
        dtype: str = "auto",
        device_map: str | None = None,
        max_batch_size: int = 8,
        trust_remote_code: bool = False,
        attn_implementation: str | None = None,
        load_in_bits: int | None = None,
    ) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self._torch = torch
        try:
            precision = inference_precision("auto", dtype, checkpoint=folder)
        except ValueError as exc:
            raise EngineError(str(exc)) from None
        cuda = precision.device.startswith("cuda")
        kwargs: dict[str, Any] = {
            "dtype": precision.torch_dtype(),
            "device_map": device_map or ("auto" if cuda else "cpu"),
            "attn_implementation": attn_implementation or precision.attention,
            "trust_remote_code": trust_remote_code,
        }
        if load_in_bits:
            from tandemlm.models.bnb import bnb_config

            kwargs["quantization_config"] = bnb_config(load_in_bits)
        self.tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
        self.model = AutoModelForCausalLM.from_pretrained(folder, **kwargs).eval()
        self.device = next(self.model.parameters()).device
        config = self.model.config
        limit = getattr(config, "max_position_embeddings", None) or self.tokenizer.model_max_length
        self.info = EngineInfo(
            backend="transformers",
            model_id=model_id,
            context_length=int(min(limit, 1 << 20)),
            has_chat_template=bool(self.tokenizer.chat_template),
        )
        self._eos = stop_ids(self.tokenizer, self.model.generation_config)
        self._pad = (
            self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else min(self._eos, default=0)
        )
        from tandemlm.deploy.hf_sampling import JsonGrammars

        self._grammars = JsonGrammars(self.tokenizer, self._eos)
        # LoRA adapters (PEFT) on the one resident model: each batch row runs with its own (or none).
        self._peft: Any = None
        self._adapters: dict[str, str] = {}
        # PEFT routes rows to adapters with hooks on the shared modules: one forward pass at a time.
        self._forward_lock = threading.Lock()
        self._max_batch = max_batch_size
        self.max_batch_rows = 0  # the most requests one batch decoded together (tests read it)
        self._work: WorkQueue[_Row] = WorkQueue(self._loop, "hf-scheduler")
        self._work.start()

    # ---- tokenizer and template --------------------------------------------------------------
    def render_chat(
        self,
        messages: Sequence[Message],
        add_generation_prompt: bool = True,
        tools: Sequence[dict[str, Any]] | None = None,
    ) -> str:
        return render_with_tokenizer(self.tokenizer, self.info.model_id, messages, add_generation_prompt, tools)

    def chat_template_source(self) -> str | None:
        return tokenizer_template(self.tokenizer)

    def special_tokens(self) -> dict[str, str | None]:
        return tokenizer_special_tokens(self.tokenizer)

    def vocabulary_pieces(self) -> Iterator[str | bytes]:
        # Byte-level tokens spell each byte as one character, so their length bounds the text's.
        return iter(self.tokenizer.get_vocab())

    def vocab_size(self) -> int:
        # The embedding may be padded past the tokenizer (or the tokenizer carry extra added tokens).
        return max(len(self.tokenizer), int(self.model.config.vocab_size))

    def tokenize(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])

    def detokenize(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)

    # ---- primitives --------------------------------------------------------------------------
    def check_params(self, params: SamplingParams) -> None:
        """Also refuses logit_bias on ids outside the vocabulary and a JSON schema llguidance rejects."""
        super().check_params(params)
        self._check_adapter(params.adapter)
        vocab = self.vocab_size()
        for token in params.logit_bias:
            if token >= vocab:
                raise EngineError(f"logit_bias: {token} is not a token id (the vocabulary has {vocab})")
        if params.constraint is not None:
            self._grammars.grammar(params.constraint)

    def stream_tokens(
        self, prompt_ids: list[int], params: SamplingParams, cancel: threading.Event | None = None
    ) -> Iterator[GeneratedToken]:
        row = _Row(prompt=list(prompt_ids), params=params, cancelled=cancel or threading.Event())
        if params.constraint is not None:  # built here, so the scheduler thread never waits on a grammar
            row.grammar = self._grammars.matcher(params.constraint)
        self._work.submit(row)
        return drain_tokens(row.out, row.cancelled)

    def score_tokens(self, prompt_ids: list[int], target_ids: list[int]) -> list[float]:
        return [token.logprob for token in self.prompt_logprobs(prompt_ids, target_ids)]

    def prompt_logprobs(
        self, prompt_ids: list[int], target_ids: list[int], top: int = 0, adapter: str | None = None
    ) -> list[GeneratedToken]:
        from tandemlm.deploy.hf_sampling import logprob_records

        self._check_adapter(adapter)
        if not self._work.running:
            raise EngineError("engine closed")
        if not prompt_ids:
            raise EngineError("scoring needs at least one prompt token before the targets")
        if not target_ids:
            return []
        torch = self._torch
        ids = torch.tensor([prompt_ids + target_ids], device=self.device)
        with torch.inference_mode():
            logits = self._forward([adapter], input_ids=ids).logits[0, len(prompt_ids) - 1 : -1]
            return logprob_records(logits, target_ids, top)

    # ---- LoRA adapters -------------------------------------------------------------------------
    def load_adapter(self, name: str, path: str) -> None:
        """Loads the LoRA adapter folder ``path`` (safetensors) as ``name``, beside the base and other adapters."""
        from peft import PeftModel

        if name in self._adapters:
            raise EngineError(f"adapter {name!r} is already loaded (from {self._adapters[name]})")
        folder = adapter_weights(path).parent
        if json.loads((folder / "adapter_config.json").read_text()).get("use_dora"):
            raise EngineError(
                f"adapter {folder}: DoRA adapters cannot share a batch (PEFT's mixed-adapter inference); merge it instead"
            )
        with self._forward_lock:  # no forward pass may run while PEFT rewires the modules
            try:
                if self._peft is None:
                    self._peft = PeftModel.from_pretrained(self.model, str(folder), adapter_name=name).eval()
                else:
                    self._peft.load_adapter(str(folder), adapter_name=name)
            except (RuntimeError, ValueError, KeyError, TypeError) as exc:
                self._forget_adapter(name)
                detail = " ".join(str(exc).split())  # PEFT lists every mismatched tensor: the first few say it
                detail = detail if len(detail) <= 300 else detail[:299] + "…"
                raise EngineError(f"adapter {folder} does not fit {self.info.model_id}: {detail}") from None
        self._adapters[name] = str(folder)

    def loaded_adapters(self) -> list[str]:
        return list(self._adapters)

    def _forget_adapter(self, name: str) -> None:
        """Removes what a failed load left behind, so the base (and other adapters) answer as before."""
        from peft.tuners.tuners_utils import BaseTunerLayer

        if self._peft is not None:
            if name in self._peft.peft_config:
                self._peft.delete_adapter(name)
            return
        # A failed first load leaves its layers injected (with random weights when saved so): delete them.
        for module in self.model.modules():
            if isinstance(module, BaseTunerLayer) and name in module.lora_A:
                module.delete_adapter(name)
        config = getattr(self.model, "peft_config", None)
        if isinstance(config, dict):
            config.pop(name, None)

    def _check_adapter(self, adapter: str | None) -> None:
        if adapter is not None and adapter not in self._adapters:
            loaded = ", ".join(self._adapters) or "none"
            raise EngineError(f"adapter {adapter!r} is not loaded (loaded: {loaded})")

    def _forward(self, adapters: Sequence[str | None], **inputs: Any) -> Any:
        """One forward pass in which row i runs with adapter ``adapters[i]`` (None: the base alone)."""
        with self._forward_lock:
            if self._peft is None:
                return self.model(**inputs)
            # Always named: without adapter_names PEFT applies its active adapter to every row.
            return self._peft(**inputs, adapter_names=[a or "__base__" for a in adapters])

    def close(self) -> None:
        """Stops the scheduler, then fails every queued and running request; later requests fail at once."""
        for row in self._work.stop() or []:  # waits out at most one forward pass
            self._fail(row, EngineError("engine closed"))

    @staticmethod
    def _fail(row: _Row, error: EngineError) -> None:
        if not row.done:
            row.done = True
            row.out.put(error)

    # ---- scheduler ---------------------------------------------------------------------------
    def _loop(self) -> None:
        while self._work.running:
            try:
                first = self._work.items.get(timeout=0.5)
            except queue.Empty:
                continue
            rows = [first] if first is not None else []
            while len(rows) < self._max_batch:
                try:
                    item = self._work.items.get_nowait()
                except queue.Empty:
                    break
                if item is not None:
                    rows.append(item)
            for row in rows:
                if row.cancelled.is_set():  # cancelled while queued: end its stream, never run it
                    row.done = True
                    row.out.put(None)
            rows = [r for r in rows if not r.done]
            if not rows:
                continue
            try:
                self._run_batch(rows)
            except Exception as exc:  # noqa: BLE001 - fail these requests, keep serving
                for row in rows:
                    self._fail(row, EngineError(f"generation failed: {exc}"))
            for row in rows:
                if not row.done:
                    row.done = True
                    row.out.put(None)

    def _run_batch(self, rows: list[_Row]) -> None:
        torch = self._torch
        self.max_batch_rows = max(self.max_batch_rows, len(rows))
        from transformers import DynamicCache

        from tandemlm.deploy.hf_sampling import RowSampler

        width = max(len(r.prompt) for r in rows)
        input_ids = torch.full((len(rows), width), self._pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            input_ids[i, width - len(row.prompt) :] = torch.tensor(row.prompt)
            mask[i, width - len(row.prompt) :] = 1
        input_ids, mask = input_ids.to(self.device), mask.to(self.device)
        samplers = [RowSampler(r.params, self.device, len(r.prompt), r.grammar) for r in rows]
        cache = DynamicCache(config=self.model.config)
        steps = max(r.params.max_tokens for r in rows)
        adapters = [r.params.adapter for r in rows]
        next_input = input_ids
        with torch.inference_mode():
            for _ in range(steps):
                if not self._work.running:  # close(): answer every row now instead of decoding on
                    for row in rows:
                        self._fail(row, EngineError("engine closed"))
                    return
                positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, -next_input.shape[1] :]
                out = self._forward(
                    adapters,
                    input_ids=next_input,
                    attention_mask=mask,
                    position_ids=positions,
                    past_key_values=cache,
                    use_cache=True,
                )
                tokens = self._step_rows(rows, samplers, out.logits[:, -1, :])
                if all(r.done for r in rows):
                    return
                next_input = torch.tensor(tokens, device=self.device)[:, None]
                mask = torch.cat([mask, torch.ones((len(rows), 1), dtype=mask.dtype, device=self.device)], dim=1)

    def _step_rows(self, rows: list[_Row], samplers: list[Any], logits: Any) -> list[int]:
        """Samples and emits one token per live row; the next input ids (padding for finished rows)."""
        tokens = []
        for i, row in enumerate(rows):
            if row.done or row.cancelled.is_set():
                if not row.done:  # cancelled mid-batch: end its stream now
                    row.done = True
                    row.out.put(None)
                tokens.append(self._pad)
                continue
            history = self._torch.tensor([row.prompt + row.generated], device=self.device)
            try:
                token = samplers[i].step(history, logits[i : i + 1].float())
            except Exception as exc:  # noqa: BLE001 - this row's sampling failed: end it, the others decode on
                self._fail(row, exc if isinstance(exc, EngineError) else EngineError(f"sampling failed: {exc}"))
                tokens.append(self._pad)
                continue
            tokens.append(token.token_id)
            self._emit(row, token)
        return tokens

    def _emit(self, row: _Row, generated: GeneratedToken) -> None:
        token = generated.token_id
        if token in self._eos:
            row.done = True
            row.out.put(None)
            return
        row.generated.append(token)
        text = self.tokenizer.decode(row.generated, skip_special_tokens=True)
        # A trailing U+FFFD is usually an incomplete UTF-8 character: wait for its next byte.
        stable = text[:-1] if text.endswith("\ufffd") else text
        piece = stable[len(row.emitted_text) :] if stable.startswith(row.emitted_text) else ""
        row.emitted_text += piece
        generated.text = piece
        row.out.put(generated)
        if len(row.generated) >= row.params.max_tokens:
            row.done = True
            row.out.put(None)


def _available() -> str | None:
    missing = [name for name in ("torch", "transformers") if importlib.util.find_spec(name) is None]
    return f"not installed: {', '.join(missing)}" if missing else None


@register_backend(
    "transformers", description="Hugging Face transformers (CPU or GPU, any HF causal LM)", available=_available
)
def load_hf(source: ModelSource, **options: Any) -> HFEngine:
    """Loads ``source`` (an HF folder; built-ins are materialised) with dtype, device_map, max_batch_size,
    load_in_bits, and ``adapters`` ({name: LoRA adapter folder}) served beside the base."""
    known = {"dtype", "device_map", "max_batch_size", "attn_implementation", "load_in_bits"}
    kwargs = {k: v for k, v in options.items() if k in known and v is not None}
    folder = source.hf_folder()
    engine = HFEngine(str(folder), source.model_id, trust_remote_code=source.trust_remote_code, **kwargs)
    engine.load_adapters(options.get("adapters"))
    return engine
