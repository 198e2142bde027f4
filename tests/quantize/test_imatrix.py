"""Importance matrices: llama.cpp's llama-imatrix on a tiny model, checked against transformers' own
activations; read back; used by the quantizer; refused when corrupt or made for another model."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tandemlm.errors import QuantizeError
from tandemlm.quantize.imatrix import (
    ImatrixChoice,
    ImatrixEntry,
    QuantizerImatrix,
    check_fits,
    choose_imatrix,
    compute_imatrix,
    prepare_imatrix,
    read_imatrix,
)
from tandemlm.quantize.pipeline import QuantizeConfig
from tandemlm.quantize.quant_types import get_quant_type
from tandemlm.quantize.quantizer import quantize_gguf
from tandemlm.quantize.texts import Text, builtin_calibration
from tandemlm.testing.tiny_models import fixture_gguf, tiny_model

CHUNK = 64
CHUNKS = 3


@pytest.fixture(scope="module")
def calibration() -> Text:
    return Text("first acts", builtin_calibration().content[:20_000])


@pytest.fixture(scope="module")
def llama_matrix(tmp_path_factory: pytest.TempPathFactory, calibration: Text) -> Path:
    out = tmp_path_factory.mktemp("imatrix") / "tiny-llama.imatrix.gguf"
    return compute_imatrix(fixture_gguf("llama"), calibration, out, chunks=CHUNKS, chunk_size=CHUNK, threads=1)


def test_the_matrix_covers_every_weight_matrix_of_every_layer_with_the_tokens_seen(llama_matrix: Path) -> None:
    imatrix = read_imatrix(llama_matrix)
    layer0 = {name for name in imatrix.entries if name.startswith("blk.0.")}
    expected = {f"blk.0.{part}.weight" for part in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")}
    assert layer0 == expected
    assert imatrix.chunk_count == CHUNKS and imatrix.chunk_size == CHUNK
    entry = imatrix.entries["blk.0.attn_q.weight"]
    assert entry.counts.tolist() == [CHUNKS * CHUNK]  # every token of every chunk, once
    hidden = json.loads((tiny_model("llama") / "config.json").read_text())["hidden_size"]
    assert entry.ne0 == hidden and np.all(entry.sums > 0)
    check_fits(imatrix, fixture_gguf("llama"))


def test_the_sums_are_the_squared_activations_transformers_computes(llama_matrix: Path, calibration: Text) -> None:
    """Independent check: the inputs of layer 0's q_proj and down_proj, squared and summed over the same
    windows of tokens in HF's fp32 model, equal llama.cpp's sums (f32 GGUF) to 1e-3."""
    import llama_cpp
    import torch
    from transformers import AutoModelForCausalLM

    vocab = llama_cpp.Llama(str(fixture_gguf("llama")), vocab_only=True, verbose=False)
    ids = vocab.tokenize(calibration.content.encode(), add_bos=True, special=False)
    bos = vocab.token_bos() if vocab._model.add_bos_token() else None  # llama-imatrix puts BOS first in each window
    model = AutoModelForCausalLM.from_pretrained(tiny_model("llama"), dtype=torch.float32)
    layer = model.model.layers[0]
    sums: dict[str, torch.Tensor | None] = {"blk.0.attn_q.weight": None, "blk.0.ffn_down.weight": None}

    def keep(name: str):
        def hook(_module, inputs) -> None:
            x = inputs[0].reshape(-1, inputs[0].shape[-1]).double()
            sums[name] = (x * x).sum(0) + (0 if sums[name] is None else sums[name])
        return hook

    layer.self_attn.q_proj.register_forward_pre_hook(keep("blk.0.attn_q.weight"))
    layer.mlp.down_proj.register_forward_pre_hook(keep("blk.0.ffn_down.weight"))
    with torch.no_grad():
        for chunk in range(CHUNKS):
            window = list(ids[chunk * CHUNK : (chunk + 1) * CHUNK])
            if bos is not None:
                window[0] = bos
            model(torch.tensor([window]))
    imatrix = read_imatrix(llama_matrix)
    for name, expected in sums.items():
        np.testing.assert_allclose(imatrix.entries[name].sums, expected.numpy(), rtol=1e-3, atol=1e-5, err_msg=name)


def test_quantizing_with_the_matrix_changes_the_weights(llama_matrix: Path, tmp_path: Path) -> None:
    source = fixture_gguf("llama")
    plain, weighted = tmp_path / "plain.gguf", tmp_path / "weighted.gguf"
    qtype = get_quant_type("q4_0")
    quantize_gguf(source, plain, qtype, nthread=1)
    quantize_gguf(source, weighted, qtype, nthread=1, imatrix=QuantizerImatrix(read_imatrix(llama_matrix)))
    digest = lambda path: hashlib.sha256(path.read_bytes()).hexdigest()  # noqa: E731
    assert digest(plain) != digest(weighted)
    from gguf import GGUFReader

    fields = GGUFReader(weighted).fields  # recorded as llama-quantize records it
    assert bytes(fields["quantize.imatrix.file"].parts[-1]).decode() == llama_matrix.name
    assert int(fields["quantize.imatrix.entries_count"].parts[-1][0]) == len(read_imatrix(llama_matrix).entries)
    assert "quantize.imatrix.file" not in GGUFReader(plain).fields
    again = tmp_path / "again.gguf"
    quantize_gguf(source, again, qtype, nthread=1)
    assert digest(plain) == digest(again)  # deterministic: the difference is the matrix
    matrix = read_imatrix(llama_matrix)
    matrix.entries = {name: ImatrixEntry(np.ones_like(e.sums), e.counts) for name, e in matrix.entries.items()}
    flat = tmp_path / "flat.gguf"
    quantize_gguf(source, flat, qtype, nthread=1, imatrix=QuantizerImatrix(matrix))
    assert digest(flat) != digest(weighted)  # the matrix's values, not only its presence, shape the weights


def test_types_that_need_a_matrix_are_refused_without_one_before_any_work(tmp_path: Path) -> None:
    with pytest.raises(QuantizeError, match=r"^type iq3_xxs needs an importance matrix .*--imatrix auto"):
        QuantizeConfig(model="smollm2", qtype="iq3_xxs", imatrix="none")
    with pytest.raises(QuantizeError, match=r"^type iq2_xxs needs an importance matrix"):
        quantize_gguf(fixture_gguf("llama"), tmp_path / "x.gguf", get_quant_type("iq2_xxs"))
    assert not (tmp_path / "x.gguf").exists()
    assert get_quant_type("iq4_xs").needs_imatrix is False and get_quant_type("q2_k_s").needs_imatrix


def test_a_corrupt_or_foreign_matrix_is_refused_in_one_line_naming_it(llama_matrix: Path, tmp_path: Path) -> None:
    corrupt = tmp_path / "corrupt.gguf"
    corrupt.write_bytes(b"GGUF" + os.urandom(200))
    for bad in (corrupt, tmp_path / "missing.gguf"):
        with pytest.raises(QuantizeError) as caught:
            choose_imatrix(str(bad), None)
        assert str(bad) in str(caught.value) and "\n" not in str(caught.value)
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(llama_matrix.read_bytes()[:3000])
    with pytest.raises(QuantizeError, match=str(truncated)):
        read_imatrix(truncated)
    with pytest.raises(QuantizeError, match=r"was made for another model \(tiny-deepseek_v3.* has no tensor blk\.0\.attn_k\.weight\)"):
        check_fits(read_imatrix(llama_matrix), fixture_gguf("deepseek_v3"))
    narrowed = read_imatrix(llama_matrix)
    entry = narrowed.entries["blk.0.ffn_up.weight"]
    narrowed.entries["blk.0.ffn_up.weight"] = ImatrixEntry(entry.sums[: entry.ne0 // 2], entry.counts)
    with pytest.raises(QuantizeError, match=r"blk\.0\.ffn_up\.weight takes \d+ values in .*, the matrix has \d+\)"):
        check_fits(narrowed, fixture_gguf("llama"))


def test_auto_is_computed_once_into_the_cache_and_reused(llama_matrix: Path, calibration: Text, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    choice = ImatrixChoice("auto", calibration=calibration, chunks=CHUNKS, chunk_size=CHUNK)
    cached = tmp_path / f"imatrix-{choice.tag()}.gguf"
    cached.write_bytes(llama_matrix.read_bytes())  # as a first run would have left it
    from tandemlm.quantize import imatrix as module

    monkeypatch.setattr(module, "compute_imatrix", lambda *a, **k: pytest.fail("must reuse the cached matrix"))
    prepared = prepare_imatrix(choice, fixture_gguf("llama"), tmp_path, threads=1)
    assert prepared is not None and prepared.source.datasets == ["first acts"]
    other = ImatrixChoice("auto", calibration=Text("other", calibration.content[:9000]), chunks=CHUNKS, chunk_size=CHUNK)
    assert other.tag() != choice.tag()


def test_kill_9_while_computing_leaves_no_file_and_a_rerun_completes(calibration: Text, tmp_path: Path) -> None:
    out = tmp_path / "killed.imatrix.gguf"
    text = tmp_path / "calibration.txt"
    text.write_text(calibration.content)
    script = (
        "import sys; from pathlib import Path; from tandemlm.testing.tiny_models import fixture_gguf;"
        "from tandemlm.quantize.imatrix import compute_imatrix; from tandemlm.quantize.texts import Text;"
        f"compute_imatrix(fixture_gguf('llama'), Text('t', Path({str(text)!r}).read_text()), Path({str(out)!r}),"
        f" chunks=200, chunk_size={CHUNK}, threads=1)"
    )
    child = subprocess.Popen([sys.executable, "-c", script], start_new_session=True)
    deadline = time.monotonic() + 120
    while not any(p.name.endswith(".partial") for p in tmp_path.iterdir()) and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(child.pid, signal.SIGKILL)
    child.wait()
    assert not out.exists()
    compute_imatrix(fixture_gguf("llama"), calibration, out, chunks=CHUNKS, chunk_size=CHUNK, threads=1)
    assert read_imatrix(out).chunk_count == CHUNKS
