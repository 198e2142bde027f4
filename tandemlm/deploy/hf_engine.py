"""Hugging Face ``transformers`` models, with concurrent requests batched continuously.

A scheduler thread decodes the running requests together, one token per step, over a shared KV
cache. Between steps, rows that finished or were cancelled leave the batch and waiting requests
are prefilled and join it (``hf_batch``), up to ``max_batch_size`` rows. Each row keeps its own
sampling settings (transformers' logits processors), its own seeded generator and its own JSON
grammar (``hf_sampling``), so a request gives the same tokens alone or in a batch.
"""

from __future__ import annotations

import importlib.util
import queue
import threading
from collections import deque
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from tandemlm.deploy.engine import BaseEngine, PromptLogprobScoring, check_embed_inputs
from tandemlm.deploy.hf_tokenizer import HFTokenizerMethods
from tandemlm.deploy.registry import register_backend
from tandemlm.deploy.scheduling import WorkQueue, drain_tokens
from tandemlm.deploy.types import OPTIONAL_FEATURES, EngineInfo, GeneratedToken, SamplingParams
from tandemlm.errors import EngineError
from tandemlm.hardware import inference_precision
from tandemlm.models.adapter_files import adapter_weights, read_adapter_config
from tandemlm.models.resolve import ModelSource
from tandemlm.models.stops import stop_ids

if TYPE_CHECKING:  # hf_batch imports torch: loaded by the scheduler thread, not when the backend registers
    from tandemlm.deploy.hf_batch import Batch, Row


class HFEngine(HFTokenizerMethods, PromptLogprobScoring, BaseEngine):
    """A transformers causal LM with batched decoding of concurrent requests."""

    features = OPTIONAL_FEATURES

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
        self._tok_lock = threading.Lock()
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
        # Row ids of each recent decode step, oldest first: who shared a step (tests and benches read it).
        self.step_log: deque[tuple[int, ...]] = deque(maxlen=4096)
        self.rows_submitted = 0  # a row's id is its number in submission order
        self._ids_lock = threading.Lock()
        self._work: WorkQueue[Row] = WorkQueue(self._loop, "hf-scheduler")
        self._work.start()

    # ---- tokenizer and template (the rest: HFTokenizerMethods) ---------------------------------
    def vocab_size(self) -> int:
        # The embedding may be padded past the tokenizer (or the tokenizer carry extra added tokens).
        return max(len(self.tokenizer), int(self.model.config.vocab_size))

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
        from tandemlm.deploy.hf_batch import Row

        row = Row(prompt=list(prompt_ids), params=params, cancelled=cancel or threading.Event())
        with self._ids_lock:
            self.rows_submitted += 1
            row.id = self.rows_submitted
        if params.constraint is not None:  # built here, so the scheduler thread never waits on a grammar
            row.grammar = self._grammars.matcher(params.constraint)
        self._work.submit(row)
        return drain_tokens(row.out, row.cancelled)

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

    def embed(self, token_lists: list[list[int]]) -> list[list[float]]:
        """The mean of the last layer's (normalised) hidden states over each token list, L2-normalised, as
        llama.cpp's mean pooling: one forward pass per list, so no padding enters a mean."""
        if not self._work.running:
            raise EngineError("engine closed")
        check_embed_inputs(token_lists)
        torch, vectors = self._torch, []
        for ids in token_lists:
            with torch.inference_mode():
                out = self._forward([None], input_ids=torch.tensor([ids], device=self.device), output_hidden_states=True)
                mean = out.hidden_states[-1][0].float().mean(0)
            vectors.append((mean / mean.norm().clamp_min(1e-12)).tolist())
        return vectors

    # ---- LoRA adapters -------------------------------------------------------------------------
    def load_adapter(self, name: str, path: str) -> None:
        """Loads the LoRA adapter folder ``path`` (safetensors) as ``name``, beside the base and other adapters."""
        from peft import PeftModel

        if name in self._adapters:
            raise EngineError(f"adapter {name!r} is already loaded (from {self._adapters[name]})")
        folder = adapter_weights(path).parent
        if read_adapter_config(folder).get("use_dora"):
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
            row.finish(EngineError("engine closed"))

    # ---- scheduler ---------------------------------------------------------------------------
    def _loop(self) -> None:
        """Until close(): takes queued rows, admits what fits into the running batch, decodes one step."""
        batch: Batch | None = None
        waiting: deque[Row] = deque()
        try:
            with self._torch.inference_mode():
                while self._work.running:
                    try:
                        self._take(waiting, block=batch is None and not waiting)
                        batch = self._admit(batch, waiting)
                        if batch is not None and self._work.running:
                            batch = self._decode(batch)
                    except Exception as exc:  # noqa: BLE001 - fail the running requests, keep serving
                        for row in batch.rows if batch is not None else []:
                            row.finish(EngineError(f"generation failed: {exc}"))
                        batch = None
        finally:
            # close(): no caller may be left waiting on a row this thread holds.
            for row in [*waiting, *(batch.rows if batch is not None else [])]:
                row.finish(EngineError("engine closed"))

    def _take(self, waiting: deque[Row], block: bool) -> None:
        """Moves every queued row to ``waiting`` (when ``block``, first waits up to 0.5 s for one).

        Taking them all, not only what fits, lets a row cancelled while it waits end its stream now.
        """
        try:
            item = self._work.items.get(timeout=0.5) if block else self._work.items.get_nowait()
            while True:
                if item is not None:  # None: close() waking the thread
                    waiting.append(item)
                item = self._work.items.get_nowait()
        except queue.Empty:
            pass
        for row in [r for r in waiting if r.cancelled.is_set()]:
            row.finish()  # cancelled while queued: end its stream, never run it
            waiting.remove(row)

    def _admit(self, batch: Batch | None, waiting: deque[Row]) -> Batch | None:
        """Prefills the waiting rows the batch has room for and joins them to it (or starts a batch)."""
        if batch is not None and not batch.mergeable:
            return batch  # static fallback (see Batch.mergeable): new rows wait for this batch to end
        room = self._max_batch - (len(batch.rows) if batch is not None else 0)
        joining = [waiting.popleft() for _ in range(min(room, len(waiting)))]
        if not joining:
            return batch
        try:
            fresh = self._prefill(joining)
            if fresh is None:  # every new row ended on its first token
                return batch
            if batch is None:
                batch = fresh
            else:
                batch.join(fresh)
        except Exception as exc:  # noqa: BLE001 - fail the new requests; the running rows decode on
            for row in joining:
                row.finish(EngineError(f"generation failed: {exc}"))
            return batch
        self.max_batch_rows = max(self.max_batch_rows, len(batch.rows))
        return batch

    def _prefill(self, rows: list[Row]) -> Batch | None:
        """Runs the rows' prompts as a batch of their own and samples each row's first token."""
        from tandemlm.deploy.hf_batch import Batch
        from tandemlm.deploy.hf_sampling import RowSampler

        input_ids, mask = Batch.prompts(rows, self._pad, self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = Batch.new_cache(self.model.config)
        samplers = [RowSampler(r.params, self.device, len(r.prompt), r.grammar) for r in rows]
        adapters = [r.params.adapter for r in rows]
        out = self._forward(
            adapters,
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=positions,
            past_key_values=cache,
            use_cache=True,
        )
        first = self._step_rows(rows, samplers, out.logits[:, -1, :])
        return self._retire(Batch(rows, samplers, cache, mask, first))

    def _decode(self, batch: Batch) -> Batch | None:
        """One step of every live row: feeds each its last token and samples the next; the batch left after it."""
        live = self._retire(batch)  # rows cancelled since the last step leave before it, not after
        if live is None:
            return None
        out = self._forward(live.adapters, **live.step_inputs())
        ids = tuple(row.id for row in live.rows if not row.done)
        self.step_log.append(ids)
        self.max_batch_rows = max(self.max_batch_rows, len(ids))
        live.next_ids = self._step_rows(live.rows, live.samplers, out.logits[:, -1, :])
        return self._retire(live)

    @staticmethod
    def _retire(batch: Batch) -> Batch | None:
        """Ends cancelled rows' streams and drops finished rows with their KV rows; None once none is left.

        A batch that cannot drop rows (see ``Batch.mergeable``) keeps them, feeding padding, until all end.
        """
        for row in batch.rows:
            if row.cancelled.is_set():
                row.finish()  # cancelled mid-batch: end its stream now
        live = [i for i, row in enumerate(batch.rows) if not row.done]
        if not live:
            return None
        if batch.mergeable:
            batch.keep(live)
        return batch

    def _step_rows(self, rows: list[Row], samplers: list[Any], logits: Any) -> list[int]:
        """Samples and emits one token per live row; the next input ids (padding for finished rows)."""
        tokens = []
        for i, row in enumerate(rows):
            if row.done or row.cancelled.is_set():
                row.finish()  # no-op for a finished row; a cancelled one's stream ends now
                tokens.append(self._pad)
                continue
            history = self._torch.tensor([row.prompt + row.generated], device=self.device)
            try:
                token = samplers[i].step(history, logits[i : i + 1].float())
            except Exception as exc:  # noqa: BLE001 - this row's sampling failed: end it, the others decode on
                row.finish(exc if isinstance(exc, EngineError) else EngineError(f"sampling failed: {exc}"))
                tokens.append(self._pad)
                continue
            tokens.append(token.token_id)
            self._emit(row, token)
        return tokens

    def _emit(self, row: Row, generated: GeneratedToken) -> None:
        token = generated.token_id
        if token in self._eos:  # reported (with its log-probability) without text, then the row ends
            generated.text, generated.end = "", True
            row.out.put(generated)
            row.finish()
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
            row.finish()


def _available() -> str | None:
    missing = [name for name in ("torch", "transformers") if importlib.util.find_spec(name) is None]
    return f"not installed: {', '.join(missing)}" if missing else None


@register_backend(
    "transformers", description="Hugging Face transformers (CPU or GPU, any HF causal LM)", available=_available,
    options={"n_parallel": "max_batch_size", "dtype": "dtype"},
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
