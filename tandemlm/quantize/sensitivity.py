"""How much each group of tensors adds to the KL divergence at each candidate type, measured.

The groups are a model's quantized weight matrices by kind (``attn_q.weight``, ``ffn_down.weight``,
...) and band of layers, plus each tensor outside the layers (``token_embd.weight``,
``output.weight``). A *probe* is the whole model quantized with every group at the high type
(``q8_0``) but one group at a lower candidate; its mean KL(original ‖ probe) on a slice of the
calibration text, minus the all-high file's, is that group's ΔKLD at that type. The original's
logits are computed once (:class:`KLProbe`). Candidates a group's rows cannot hold (k-quants need
rows of multiples of 256) are not measured: llama.cpp would store another type. ``f16`` is a
candidate too: a float matrix is multiplied with float activations, where every quantized type
rounds the activations to 8 bits, so it can lower the KLD below what any quantized type reaches.

A measurement is cached in the model's quantize cache entry as ``mixed-sensitivity-<key>.json``,
the key hashing the source file, the high type, the grouping, the calibration slice, the importance
matrix and llama.cpp's version; a candidate added later is measured on its own and added to it.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from tandemlm.errors import QuantizeError
from tandemlm.models.gguf_info import GGUFInfo, TensorInfo, read_gguf_info
from tandemlm.quantize.cache import content_key, file_digest, temp_folder
from tandemlm.quantize.imatrix import QuantizerImatrix
from tandemlm.quantize.llamacpp_tools import llama_cpp_version
from tandemlm.quantize.quant_types import QuantType, get_quant_type
from tandemlm.quantize.quantizer import quantize_gguf
from tandemlm.quantize.reference import LogitStore
from tandemlm.quantize.report_maths import Agreement, windows
from tandemlm.quantize.texts import Text
from tandemlm.storage.atomic import atomic_write_text

HIGH_TYPE = "q8_0"
# 32-weight blocks fit any row of a multiple of 32; q6_k and q4_k only rows of multiples of 256.
CANDIDATES: tuple[str, ...] = ("f16", "q8_0", "q6_k", "q5_1", "q5_0", "q4_1", "q4_k", "iq4_nl")
ALIGNMENT = 32  # GGUF's default general.alignment: every tensor's data is padded to a multiple of it
BANDS = 6  # default layer bands per kind: groups = kinds × 6 (+ the tensors outside the layers)
_LAYER = re.compile(r"^blk\.(\d+)\.(.+)$")
# Override for every tensor: safe, since llama.cpp applies overrides only to the tensors it quantizes
# (2-D and 3-D weights, never norms, routers or position embeddings: tensor_allows_quantization).
EVERY_TENSOR = "."

ProbeProgress = Callable[[int, int, str], None]  # (done, total, what is measured now)


def quant_size(type_name: str) -> tuple[int, int]:
    """(weights per block, bytes per block) of a ggml type (any case); a one-line error for an unknown one."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    try:
        return GGML_QUANT_SIZES[GGMLQuantizationType[type_name.upper()]]
    except KeyError:
        raise QuantizeError(f"unknown ggml type {type_name!r}") from None


def tensor_bytes(type_name: str, n_elements: int) -> int:
    """Bytes of ``n_elements`` weights stored as ``type_name`` (rows a multiple of its block)."""
    block, size = quant_size(type_name)
    return n_elements // block * size


def stored_bytes(type_name: str, n_elements: int) -> int:
    """:func:`tensor_bytes` padded to :data:`ALIGNMENT`: what the tensor takes in a GGUF file."""
    return -(-tensor_bytes(type_name, n_elements) // ALIGNMENT) * ALIGNMENT


@dataclass(frozen=True)
class Group:
    """Tensors that always get the same type: one kind of matrix in a band of layers, or one tensor."""

    name: str  # "ffn_down.weight blk 0-4" or "token_embd.weight"
    tensors: tuple[str, ...]
    elements: int
    row: int  # gcd of the tensors' row lengths: a type fits when its block divides it

    def fits(self, type_name: str) -> bool:
        """True when every tensor's rows are whole blocks of ``type_name`` (no llama.cpp fallback)."""
        return self.row % quant_size(type_name)[0] == 0

    def n_bytes(self, type_name: str) -> int:
        """Bytes the group's tensors take in the file at ``type_name``, padding included (the tensors of a
        group have one shape: one kind of matrix across layers, or a single tensor)."""
        return len(self.tensors) * stored_bytes(type_name, self.elements // len(self.tensors))

    def pattern(self) -> str:
        """llama.cpp tensor-type override regex matching exactly these tensors."""
        return "^(?:" + "|".join(re.escape(name) for name in self.tensors) + ")$"


def tensor_groups(info: GGUFInfo, high: str, layers_per_group: int | None = None) -> list[Group]:
    """Groups of the tensors stored as ``high`` in ``info`` (the all-high file): by kind and band of
    ``layers_per_group`` layers (default: :data:`BANDS` bands), a tensor outside the layers on its own."""
    quantized = [t for t in info.tensors if t.type_name.lower() == high.lower()]
    layers = [int(m.group(1)) for t in quantized if (m := _LAYER.match(t.name))]
    per_group = layers_per_group or max(1, math.ceil((max(layers, default=0) + 1) / BANDS))
    members: dict[tuple[str, int], list[tuple[int, TensorInfo]]] = {}
    for tensor in quantized:
        match = _LAYER.match(tensor.name)
        layer = int(match.group(1)) if match else -1
        key = (match.group(2), layer // per_group) if match else (tensor.name, -1)
        members.setdefault(key, []).append((layer, tensor))
    groups = []
    for (kind, band), rows in members.items():
        span = [layer for layer, _ in rows]
        name = kind if band < 0 else f"{kind} blk {min(span)}-{max(span)}"
        tensors = [tensor for _, tensor in rows]
        row = math.gcd(*(t.shape[0] for t in tensors))
        groups.append(Group(name, tuple(t.name for t in tensors), sum(t.n_elements for t in tensors), row))
    return groups


@dataclass
class Sensitivity:
    """A measurement: ΔKLD per group per type, and what the planner needs to size a file."""

    high: str
    groups: list[Group]
    delta_kld: dict[str, dict[str, float]]  # group name → ggml type → ΔKLD against the all-high file
    base_kld: float  # mean KL of the all-high file itself
    fixed_bytes: int  # the all-high file less its grouped tensors (padded): header, norms, other unquantized tensors
    n_params: int
    n_tensors: int
    tokens: int  # calibration positions scored per probe

    def to_json(self) -> str:
        """The measurement as the JSON cached in the model's entry."""
        return json.dumps(asdict(self), indent=1) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Sensitivity:
        """Reads :meth:`to_json`'s text back."""
        data = json.loads(text)
        data["groups"] = [Group(g["name"], tuple(g["tensors"]), g["elements"], g["row"]) for g in data["groups"]]
        return cls(**data)


@dataclass(frozen=True)
class ProbeSettings:
    """What is measured: the types tried, the grouping, and how much calibration text each probe scores."""

    high: str = field(default=HIGH_TYPE, metadata={"help": "Type every group has unless chosen lower (the probes' base)."})
    candidates: tuple[str, ...] = field(default=CANDIDATES, metadata={"help": "ggml types a group may get (the high one included)."})
    layers_per_group: int | None = field(default=None, metadata={"help": "Layers per band of a kind (default: 6 bands)."})
    tokens: int = field(default=1024, metadata={"help": "Calibration tokens scored per probe."})
    window: int = field(default=512, metadata={"help": "Tokens per scored window."})
    search: int = field(default=8, metadata={"help": "Measured moves after the knapsack (0: its plan unmeasured)."})
    threads: int | None = field(default=None, metadata={"help": "llama.cpp threads (default: quantize on all cores, score on the idle ones)."})

    def __post_init__(self) -> None:
        for name in (self.high, *self.candidates):
            quant_size(name)  # an unknown type fails in one line
        if self.high.lower() not in {c.lower() for c in self.candidates}:
            raise QuantizeError(f"candidates {', '.join(self.candidates)} must include the high type {self.high}")
        if self.layers_per_group is not None and self.layers_per_group < 1:
            raise QuantizeError(f"layers_per_group must be at least 1, got {self.layers_per_group}")
        if self.search < 0:
            raise QuantizeError(f"search must be at least 0, got {self.search}")
        if self.window < 16 or self.tokens < 2:
            raise QuantizeError(f"window must be at least 16 and tokens at least 2, got {self.window} and {self.tokens}")

    def ftype(self) -> QuantType:
        """The quant-type row whose ftype the probes are made with (its default type is ``high``)."""
        return type_row(self.high)


def type_row(type_name: str) -> QuantType:
    """The quantizer's row (ftype) whose main ggml type is ``type_name`` (q4_k_s for Q4_K); for a type
    without a row of its own (q4_1, q5_0, q5_1) one made from llama.cpp's ``LLAMA_FTYPE_MOSTLY_*``."""
    import llama_cpp

    from tandemlm.quantize.quant_types import QUANT_TYPES

    for row in QUANT_TYPES.values():
        if row.stage == "quantize" and not row.needs_imatrix and (row.block or "").lower() == type_name.lower():
            return row
    const = f"LLAMA_FTYPE_MOSTLY_{type_name.upper()}"
    if hasattr(llama_cpp, const):
        return QuantType(type_name.lower(), "quantize", const, type_name.upper(), f"llama.cpp's {const}")
    return get_quant_type(type_name)  # a one-line error listing the known types


class KLProbe:
    """Mean KL(original ‖ other) over the first ``tokens`` of ``text``; the original scored once, its
    logits on disk (:class:`LogitStore`). The windows and sums are the quality report's."""

    def __init__(self, original: Path, text: Text, tokens: int, window: int, threads: int | None, folder: Path | None = None) -> None:
        from tandemlm.quantize.logit_scorers import open_scorer

        self.n_ctx, self.threads = window, threads
        scorer = open_scorer(original, n_ctx=window, n_threads=threads)
        try:
            self.ids = scorer.tokenize(text.content)[:tokens]
            self.windows = windows(self.ids, window, scorer.bos_id())
            self.store = LogitStore(rows=sum(len(w) - 1 for w in self.windows), folder=folder)
            for span in self.windows:
                self.store.append(scorer.logits(span)[:-1])
        finally:
            scorer.close()

    def agreement(self, path: Path) -> Agreement:
        """``path`` (a quantization of the original: same tokenizer) scored on the same windows."""
        from tandemlm.quantize.logit_scorers import open_scorer

        scorer = open_scorer(path, n_ctx=self.n_ctx, n_threads=self.threads)
        try:
            found = Agreement()
            for index, span in enumerate(self.windows):
                found.add_window(self.store.window(index), scorer.logits(span)[:-1], span)
        finally:
            scorer.close()
        return found

    def close(self) -> None:
        """Removes the original's logits from disk."""
        self.store.close()


def sensitivity_key(source: Path, settings: ProbeSettings, calibration: Text, imatrix: QuantizerImatrix | None) -> str:
    """Cache key of a measurement: everything that shapes its numbers."""
    return content_key({
        "mixed": file_digest(source), "high": settings.high.lower(),
        "layers_per_group": settings.layers_per_group, "tokens": settings.tokens, "window": settings.window,
        "text": calibration.digest, "imatrix": file_digest(imatrix.source.path) if imatrix is not None else None,
        "llama.cpp": llama_cpp_version(),
    })


def measure_sensitivity(
    source: Path, entry: Path, calibration: Text, settings: ProbeSettings | None = None,
    imatrix: QuantizerImatrix | None = None, progress: ProbeProgress | None = None, temp_dir: Path | None = None,
) -> Sensitivity:
    """ΔKLD of every group of ``source`` (a float GGUF) at every candidate type that fits it, measured on
    ``calibration``; read from ``entry`` when measured before (only the candidates it lacks are measured
    now, and added there), else measured and saved there."""
    settings = settings or ProbeSettings()
    path = entry / f"mixed-sensitivity-{sensitivity_key(source, settings, calibration, imatrix)}.json"
    known = Sensitivity.from_json(path.read_text()) if path.is_file() else None
    if known is None or _trials(known.groups, known.delta_kld, settings):
        folder = temp_dir or temp_folder()
        with tempfile.TemporaryDirectory(prefix=f"{os.getpid()}-mixed-probes.", dir=folder) as work:
            probe = KLProbe(source, calibration, settings.tokens, settings.window, settings.threads, folder)
            try:
                known = _run_probes(source, Path(work), probe, settings, imatrix, progress or (lambda *_: None), known)
            finally:
                probe.close()
        entry.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, known.to_json())
    wanted = {c.lower() for c in settings.candidates}
    delta = {name: {t: d for t, d in types.items() if t in wanted} for name, types in known.delta_kld.items()}
    return replace(known, delta_kld=delta)


def _trials(groups: list[Group], delta: dict[str, dict[str, float]], settings: ProbeSettings) -> list[tuple[Group, str]]:
    """The (group, candidate) probes not measured yet: every lower candidate whose blocks fit the group's rows."""
    return [(g, t.lower()) for g in groups for t in settings.candidates
            if t.lower() != settings.high.lower() and g.fits(t) and t.lower() not in delta.get(g.name, {})]


def _run_probes(
    source: Path, work: Path, probe: KLProbe, settings: ProbeSettings, imatrix: QuantizerImatrix | None,
    progress: ProbeProgress, known: Sensitivity | None,
) -> Sensitivity:
    """The all-high file (unless ``known`` has it), then one file per missing (group, type), each scored
    against the original."""
    if known is None:
        base = _probe_file(source, work, settings, imatrix, {EVERY_TENSOR: settings.high})
        info = read_gguf_info(base)
        groups = tensor_groups(info, settings.high, settings.layers_per_group)
        progress(0, 1, f"sensitivity: all {settings.high}")
        base_kld = probe.agreement(base).kl_mean
        base.unlink()
        fixed = info.file_size - sum(g.n_bytes(settings.high) for g in groups)
        delta: dict[str, dict[str, float]] = {g.name: {settings.high.lower(): 0.0} for g in groups}
        known = Sensitivity(settings.high.lower(), groups, delta, base_kld, fixed, info.n_params, len(info.tensors), len(probe.ids))
    trials = _trials(known.groups, known.delta_kld, settings)
    for done, (group, type_name) in enumerate(trials, 1):
        progress(done, len(trials), f"sensitivity: {group.name} at {type_name}")
        path = _probe_file(source, work, settings, imatrix, {group.pattern(): type_name, EVERY_TENSOR: settings.high})
        known.delta_kld[group.name][type_name] = probe.agreement(path).kl_mean - known.base_kld
        path.unlink()
    return known


def _probe_file(source: Path, work: Path, settings: ProbeSettings, imatrix: QuantizerImatrix | None, types: dict[str, str]) -> Path:
    path = work / "probe.gguf"
    quantize_gguf(source, path, settings.ftype(), nthread=settings.threads, imatrix=imatrix, tensor_types=types, temp_dir=work)
    return path
