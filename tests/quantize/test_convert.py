"""llama.cpp's HF→GGUF converter, fetched from the llama-cpp-python sdist, on the tiny models."""

from __future__ import annotations

import io
import json
import struct
import tarfile

import pytest

from tandemlm.errors import EngineError
from tandemlm.quantize import llamacpp_tools
from tandemlm.quantize.llamacpp_tools import (
    ConversionError,
    chat_template,
    convert_hf_to_gguf,
    llama_cpp_source,
    supported_architectures,
    vocab_gguf,
)

ARCHS = ("llama", "qwen2", "deepseek_v3")
TEXTS = [
    "Hello world,  two spaces\n\tand 12345 numbers! Привет 你好 émigré",
    "def add(a, b):\n    return a + b\n",
]
MESSAGES = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What is 2+2?"}]


@pytest.fixture(scope="module", params=ARCHS)
def converted(request):
    """(arch, HF folder, f32 GGUF, HF tokenizer, vocab-only llama.cpp model) for each tiny model."""
    from llama_cpp import Llama
    from transformers import AutoTokenizer

    arch = request.param
    folder = request.getfixturevalue(f"tiny_{arch}_dir")
    gguf = request.getfixturevalue(f"tiny_{arch}_gguf")
    vocab = Llama(str(gguf), vocab_only=True, verbose=False)
    yield arch, folder, gguf, AutoTokenizer.from_pretrained(folder), vocab
    vocab.close()


def test_source_holds_the_converter_and_its_data():
    source = llama_cpp_source()
    assert (source / "convert_hf_to_gguf.py").is_file()
    assert (source / "gguf-py" / "gguf" / "lazy.py").is_file()
    assert vocab_gguf("qwen2").stat().st_size > 1_000_000
    assert "<think>" in chat_template("deepseek-ai-DeepSeek-R1-Distill-Qwen-32B")
    assert not (source / "vendor").exists() and not (source / "ggml").exists()  # only what we need


def test_unknown_vocab_and_template_names_list_known_ones():
    with pytest.raises(ConversionError, match=r"no vocab GGUF ggml-vocab-nope\.gguf .*known: .*qwen2"):
        vocab_gguf("nope")
    with pytest.raises(ConversionError, match=r"no chat template nope\.jinja .*known: .*Qwen-QwQ-32B"):
        chat_template("nope")


def test_gguf_carries_the_chat_template(converted):
    _, _, _, tokenizer, vocab = converted
    assert vocab.metadata["tokenizer.chat_template"] == tokenizer.chat_template


@pytest.mark.parametrize("text", TEXTS)
def test_same_text_gives_same_ids(converted, text):
    _, _, _, tokenizer, vocab = converted
    assert vocab.tokenize(text.encode(), add_bos=False, special=True) == tokenizer.encode(
        text, add_special_tokens=False
    )


def test_chat_prompt_gives_same_ids(converted):
    _, _, _, tokenizer, vocab = converted
    prompt = tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert vocab.tokenize(prompt.encode(), add_bos=False, special=True) == tokenizer.encode(
        prompt, add_special_tokens=False
    )
    assert vocab.token_eos() == tokenizer.eos_token_id


def test_gguf_generates_what_transformers_generates(converted):
    import llama_cpp
    import torch
    from transformers import AutoModelForCausalLM

    _, folder, gguf, tokenizer, _ = converted
    prompt = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True, return_dict=False)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        expected = model.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False)[0, len(prompt) :].tolist()
    f32 = llama_cpp.GGML_TYPE_F32  # an f16 KV cache would add its own rounding to the comparison
    llm = llama_cpp.Llama(str(gguf), n_ctx=256, n_threads=2, type_k=f32, type_v=f32, verbose=False)
    try:
        produced = []
        for token in llm.generate(prompt, top_k=1, temp=0.0):
            produced.append(token)
            if len(produced) == len(expected):
                break
    finally:
        llm.close()
    assert produced == expected


def test_convert_writes_atomically(tiny_llama_dir, tmp_path):
    from llama_cpp import Llama

    out = convert_hf_to_gguf(tiny_llama_dir, tmp_path / "tiny.gguf", outtype="q8_0")
    assert out == tmp_path / "tiny.gguf"
    assert [p.name for p in tmp_path.iterdir()] == ["tiny.gguf"]  # no temp file left behind
    llm = Llama(str(out), n_ctx=64, verbose=False)
    try:
        assert llm.metadata["general.file_type"] == "7"  # MOSTLY_Q8_0
    finally:
        llm.close()


def test_converter_knows_the_tiny_architectures():
    assert {"LlamaForCausalLM", "Qwen2ForCausalLM", "DeepseekV3ForCausalLM"} <= supported_architectures()


def test_unsupported_architecture_fails_fast_with_one_line(tiny_llama_dir, tmp_path, monkeypatch):
    started: list[list[str]] = []
    monkeypatch.setattr(llamacpp_tools, "_run_with_status", lambda command, *_: started.append(command) or (0, []))
    folder = tmp_path / "bogus"
    folder.mkdir()
    config = json.loads((tiny_llama_dir / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "architectures": ["BogusForCausalLM"]}))
    (folder / "model.safetensors").symlink_to(tiny_llama_dir / "model.safetensors")  # only the architecture is wrong
    out = tmp_path / "out" / "bogus.gguf"
    with pytest.raises(ConversionError) as caught:
        convert_hf_to_gguf(folder, out)
    assert started == []  # refused before starting the converter
    message = str(caught.value)
    assert message == (
        f"{folder}/config.json: architecture BogusForCausalLM is not supported by llama.cpp's converter "
        f"(llama-cpp-python {llamacpp_tools.llama_cpp_version()})"
    )
    assert not out.exists()


def test_multimodal_checkpoint_passes_on_its_text_architecture(tmp_path):
    config = {"architectures": ["SomeVisionModel"], "text_config": {"architectures": ["LlamaForCausalLM"]}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    llamacpp_tools._check_architecture(tmp_path)  # no error: the converter decides


def test_converter_output_is_boiled_down_to_one_line(tmp_path):
    unsupported = ["INFO:hf-to-gguf:Loading model: x", "ERROR:hf-to-gguf:Model FooForCausalLM is not supported"]
    assert "architecture FooForCausalLM is not supported" in llamacpp_tools._failure_message(tmp_path, unsupported, 1)
    traceback = [
        "INFO:hf-to-gguf:Loading model: x",
        "Traceback (most recent call last):",
        '  File "x.py"',
        "KeyError: 'x'",
    ]
    assert llamacpp_tools._failure_message(tmp_path, traceback, 1).endswith("failed (exit 1): KeyError: 'x'")


def _copy_of(folder, target):
    target.mkdir()
    for path in folder.iterdir():
        (target / path.name).write_bytes(path.read_bytes())
    return target


def test_broken_checkpoint_reports_the_converters_error(tiny_llama_dir, tmp_path):
    folder = _copy_of(tiny_llama_dir, tmp_path / "truncated")
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    message = r"^converting .*truncated to GGUF failed \(exit 1\): ValueError: Could not read complete metadata"
    with pytest.raises(ConversionError, match=message) as caught:
        convert_hf_to_gguf(folder, tmp_path / "out.gguf")
    assert "\n" not in str(caught.value)
    assert [p.name for p in tmp_path.iterdir()] == ["truncated"]


def test_folder_without_weights_is_refused(tiny_llama_dir, tmp_path):
    folder = _copy_of(tiny_llama_dir, tmp_path / "no-weights")
    (folder / "model.safetensors").unlink()
    with pytest.raises(ConversionError, match=r"no-weights has no weights \(\*\.safetensors"):
        convert_hf_to_gguf(folder, tmp_path / "out.gguf")
    assert [p.name for p in tmp_path.iterdir()] == ["no-weights"]


def test_gguf_without_tensors_is_refused(tmp_path):
    # llama.cpp's converter exits 0 after writing such a file when it finds no weights it can read.
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 0))
    with pytest.raises(ConversionError, match="wrote no tensors"):
        llamacpp_tools._check_gguf_written(empty, tmp_path)


def test_bad_arguments_fail_before_running_anything(tmp_path):
    with pytest.raises(ConversionError, match="unknown outtype 'q4_k_m'; known: f32, f16, bf16, q8_0"):
        convert_hf_to_gguf(tmp_path, tmp_path / "x.gguf", outtype="q4_k_m")
    with pytest.raises(EngineError, match=r"config\.json is missing"):
        convert_hf_to_gguf(tmp_path, tmp_path / "x.gguf")


def _fake_sdist(path, files):
    with tarfile.open(path, "w:gz") as tar:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(f"llama_cpp_python-9.9.9/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_source_keeps_only_the_needed_members(tmp_path, monkeypatch):
    sdist = _fake_sdist(
        tmp_path / "llama_cpp_python-9.9.9.tar.gz",
        {
            "vendor/llama.cpp/convert_hf_to_gguf.py": "print('converter')",
            "vendor/llama.cpp/conversion/llama.py": "",
            "vendor/llama.cpp/gguf-py/gguf/__init__.py": "",
            "vendor/llama.cpp/gguf-py/tests/test_x.py": "",
            "vendor/llama.cpp/models/templates/x.jinja": "{{ messages }}",
            "vendor/llama.cpp/models/ggml-vocab-x.gguf": "GGUF",
            "vendor/llama.cpp/models/ggml-vocab-x.gguf.inp": "",
            "vendor/llama.cpp/src/llama.cpp": "",
            "llama_cpp/llama.py": "",
        },
    )
    monkeypatch.setenv("TANDEM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv(llamacpp_tools.SDIST_ENV, str(sdist))
    source = llama_cpp_source("9.9.9")
    assert source == tmp_path / "cache" / "llama.cpp-9.9.9"
    kept = sorted(str(p.relative_to(source)) for p in source.rglob("*") if p.is_file())
    assert kept == [
        llamacpp_tools.MARKER,
        "conversion/llama.py",
        "convert_hf_to_gguf.py",
        "gguf-py/gguf/__init__.py",
        "models/ggml-vocab-x.gguf",
        "models/templates/x.jinja",
    ]
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["llama.cpp-9.9.9"]  # no staging left


def test_sdist_without_converter_is_rejected(tmp_path, monkeypatch):
    sdist = _fake_sdist(tmp_path / "empty.tar.gz", {"README.md": "nothing here"})
    monkeypatch.setenv("TANDEM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv(llamacpp_tools.SDIST_ENV, str(sdist))
    with pytest.raises(ConversionError, match=r"empty\.tar\.gz has no vendor/llama\.cpp/convert_hf_to_gguf\.py"):
        llama_cpp_source("9.9.9")
    assert list((tmp_path / "cache").iterdir()) == []
