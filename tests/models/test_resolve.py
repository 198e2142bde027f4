"""Model references resolve to checked local files; bad ones fail with one line naming the problem."""

from __future__ import annotations

import json
import socket

import pytest

from tandemlm.errors import EngineError
from tandemlm.models.builtin import builtin_gguf
from tandemlm.models.resolve import resolve_model


def test_builtin_name_resolves_to_the_packaged_gguf():
    source = resolve_model("smollm2")
    assert source.kind == "gguf" and source.builtin == "smollm2"
    assert source.path == builtin_gguf("smollm2")
    assert source.path.stat().st_size > 50_000_000


def test_local_gguf_file_resolves(tmp_path):
    link = tmp_path / "copy.gguf"
    link.symlink_to(builtin_gguf("smollm2"))
    source = resolve_model(str(link))
    assert (source.kind, source.model_id) == ("gguf", "copy")


def test_missing_path(tmp_path):
    with pytest.raises(EngineError, match="does not exist"):
        resolve_model(str(tmp_path / "nope.gguf"))


def test_file_that_is_not_gguf(tmp_path):
    bogus = tmp_path / "model.gguf"
    bogus.write_bytes(b"PK\x03\x04 definitely a zip")
    with pytest.raises(EngineError, match=r"model\.gguf is not a GGUF file"):
        resolve_model(str(bogus))


def test_truncated_gguf(tmp_path):
    cut = tmp_path / "cut.gguf"
    with builtin_gguf("smollm2").open("rb") as handle:
        cut.write_bytes(handle.read(5_000_000))
    with pytest.raises(EngineError, match=r"cut\.gguf is a (damaged or )?truncated GGUF file"):
        resolve_model(str(cut))


def test_gguf_header_only(tmp_path):
    cut = tmp_path / "stub.gguf"
    cut.write_bytes(b"GGUF\x03\x00")
    with pytest.raises(EngineError, match="truncated GGUF file"):
        resolve_model(str(cut))


def _hf_folder(tmp_path, config: dict, weights: bool = True, tokenizer: bool = True):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    if weights:
        (folder / "model.safetensors").write_bytes(b"\0" * 16)
    if tokenizer:
        (folder / "tokenizer.json").write_text("{}")
    return folder


def test_hf_folder_without_weights(tmp_path):
    folder = _hf_folder(tmp_path, {"model_type": "llama"}, weights=False)
    with pytest.raises(EngineError, match="has no weights"):
        resolve_model(str(folder))


def test_hf_folder_without_tokenizer(tmp_path):
    folder = _hf_folder(tmp_path, {"model_type": "llama"}, tokenizer=False)
    with pytest.raises(EngineError, match="has no tokenizer"):
        resolve_model(str(folder))


def test_folder_without_config(tmp_path):
    with pytest.raises(EngineError, match=r"config\.json is missing"):
        resolve_model(str(tmp_path))


def test_remote_code_model_needs_the_flag(tmp_path):
    config = {"model_type": "my_custom_lm", "auto_map": {"AutoModelForCausalLM": "modeling.MyLM"}}
    folder = _hf_folder(tmp_path, config)
    with pytest.raises(EngineError, match="--trust-remote-code"):
        resolve_model(str(folder))
    assert resolve_model(str(folder), trust_remote_code=True).trust_remote_code


def test_unknown_hub_id_fails_offline_without_a_network_call(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    attempts: list[object] = []

    def refuse(*args, **_):
        attempts.append(args[-1])
        raise OSError("network call in an offline test")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    with pytest.raises(EngineError, match="hub cannot be reached"):
        resolve_model("someone/some-model-that-is-not-here")
    assert attempts == []
