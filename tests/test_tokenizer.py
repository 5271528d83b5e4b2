"""Tokenizer: training with RoBERTa specials, GPT-2 import, loading through transformers, errors."""

from __future__ import annotations

import hashlib
import json

import pytest

from pipeline.errors import DataError, exit_on_data_error
from pipeline.data.batch import SpecialTokens
from pipeline.data.tokenizer import (TrainConfig, import_tokenizer, load_raw_tokenizer, load_tokenizer, main,
                                special_tokens, tokenizer_fingerprint, train_tokenizer)


def test_trained_tokenizer_has_roberta_specials_at_ids_0_to_4(tiny_tokenizer):
    tokenizer = load_tokenizer(tiny_tokenizer)
    assert len(tokenizer) == 1000
    assert [tokenizer.bos_token_id, tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id,
            tokenizer.mask_token_id] == [0, 1, 2, 3, 4]
    assert (tokenizer.cls_token_id, tokenizer.sep_token_id) == (0, 2)
    assert special_tokens(tokenizer) == SpecialTokens(bos=0, pad=1, eos=2, unk=3, mask=4)
    assert special_tokens(load_raw_tokenizer(tiny_tokenizer)) == SpecialTokens(bos=0, pad=1, eos=2, unk=3, mask=4)


def test_encoding_uses_roberta_template_and_decodes_losslessly(tiny_tokenizer):
    tokenizer = load_tokenizer(tiny_tokenizer)
    text = "The Prime Minister said on Tuesday: 3,000 firefighters (ünïcode €) fought   the blaze.\nNew line."
    ids = tokenizer(text)["input_ids"]
    assert ids[0] == 0 and ids[-1] == 2
    assert 3 not in ids  # byte-level: nothing is unknown
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    pair = tokenizer("first", "second")["input_ids"]
    assert pair[0] == 0 and pair.count(2) == 3  # <s> A </s></s> B </s>
    assert tokenizer.decode(tokenizer.encode("a <mask> b")) == "<s>a <mask> b</s>"


def test_fingerprint_is_sha256_of_the_file_and_directory_paths_work(tiny_tokenizer):
    expected = hashlib.sha256(tiny_tokenizer.read_bytes()).hexdigest()
    assert tokenizer_fingerprint(tiny_tokenizer) == expected
    assert tokenizer_fingerprint(tiny_tokenizer.parent) == expected
    assert len(load_tokenizer(tiny_tokenizer.parent)) == 1000


def test_cli_train_is_deterministic(tmp_path, english_text_file, tiny_tokenizer, capsys):
    assert main(["train", "--input", str(english_text_file), "--vocab-size", "1000", "--min-frequency", "2",
                 "--output", str(tmp_path)]) == 0
    written = tmp_path / "tokenizer.json"
    assert "vocab size 1000" in capsys.readouterr().out
    # Same corpus and settings as the session fixture: byte-identical file.
    assert tokenizer_fingerprint(written) == tokenizer_fingerprint(tiny_tokenizer)


def test_import_gpt2_vocab_and_merges(tmp_path, english_text_file):
    from tokenizers import ByteLevelBPETokenizer

    gpt2_like = ByteLevelBPETokenizer()
    gpt2_like.train([str(english_text_file)], vocab_size=500, min_frequency=2, special_tokens=["<|endoftext|>"],
                    show_progress=False)
    vocab_file, merges_file = gpt2_like.save_model(str(tmp_path))
    output = import_tokenizer(vocab_file, merges_file, tmp_path / "imported")
    tokenizer = load_tokenizer(output)
    # The five RoBERTa specials are appended after the 500 GPT-2 ids.
    assert special_tokens(tokenizer) == SpecialTokens(bos=500, pad=501, eos=502, unk=503, mask=504)
    assert len(tokenizer) == 505
    text = "Firefighters fought the blaze near Sydney."
    ids = tokenizer(text)["input_ids"]
    assert ids[1:-1] == gpt2_like.encode(text).ids and (ids[0], ids[-1]) == (500, 502)
    assert tokenizer.decode(ids, skip_special_tokens=True) == text


def test_import_roberta_vocab_keeps_existing_special_ids(tmp_path, tiny_tokenizer):
    raw = json.loads(tiny_tokenizer.read_text())
    (tmp_path / "vocab.json").write_text(json.dumps(raw["model"]["vocab"]))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(
        " ".join(merge) if isinstance(merge, list) else merge for merge in raw["model"]["merges"]) + "\n")
    output = import_tokenizer(tmp_path / "vocab.json", tmp_path / "merges.txt", tmp_path / "out.json")
    assert special_tokens(load_raw_tokenizer(output)) == SpecialTokens(0, 1, 2, 3, 4)
    text = "Hundreds of people have been forced to vacate their homes."
    assert load_tokenizer(output)(text)["input_ids"] == load_tokenizer(tiny_tokenizer)(text)["input_ids"]


def test_import_with_a_vocab_that_is_not_a_json_object_names_the_file(tmp_path):
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    for name, content, reason in [("broken.json", "{", "Expecting property name"), ("listed.json", '["a"]', "got list")]:
        (tmp_path / name).write_text(content)
        with pytest.raises(DataError, match=rf"{name}: not a valid JSON vocabulary .*{reason}"):
            import_tokenizer(tmp_path / name, tmp_path / "merges.txt", tmp_path / "out.json")
    assert not (tmp_path / "out.json").exists()


def test_missing_and_corrupt_tokenizer_files_raise_data_error(tmp_path):
    with pytest.raises(DataError, match="nothing.json: tokenizer file not found"):
        load_tokenizer(tmp_path / "nothing.json")
    with pytest.raises(DataError, match="tokenizer.json: tokenizer file not found"):
        load_tokenizer(tmp_path)  # a directory without tokenizer.json
    corrupt = tmp_path / "corrupt.json"
    corrupt.write_text('{"version": "1.0", "model": ')
    with pytest.raises(DataError, match="corrupt.json: not a valid tokenizer.json"):
        load_tokenizer(corrupt)


def test_tokenizer_without_roberta_specials_is_rejected(tmp_path, english_text_file):
    from tokenizers import ByteLevelBPETokenizer

    plain = ByteLevelBPETokenizer()
    plain.train([str(english_text_file)], vocab_size=300, show_progress=False)
    plain.save(str(tmp_path / "plain.json"))
    with pytest.raises(DataError, match=r"plain.json: tokenizer lacks the special tokens <s> <pad> </s> <unk> <mask>"):
        load_tokenizer(tmp_path / "plain.json")


def test_train_errors(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(DataError, match="empty.txt: input file is empty"):
        main(["train", "--input", str(empty), "--output", str(tmp_path / "t.json")])
    with pytest.raises(DataError, match="missing.txt: input file not found"):
        main(["train", "--input", str(tmp_path / "missing.txt"), "--output", str(tmp_path / "t.json")])
    with pytest.raises(ValueError, match="vocab_size"):
        TrainConfig(vocab_size=100)
    assert not (tmp_path / "t.json").exists()


def test_cli_error_is_one_line_on_stderr_with_exit_status_1(capsys):
    def failing_main():
        raise DataError("some/file.txt: input not found")

    with pytest.raises(SystemExit) as exited:
        exit_on_data_error(failing_main)
    assert exited.value.code == 1
    assert capsys.readouterr().err == "error: some/file.txt: input not found\n"


def test_training_reads_jsonl_text_not_json_syntax(tmp_path, english_text_file):
    lines = english_text_file.read_text(encoding="utf-8").splitlines()
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("".join(json.dumps({"body": line, "n": i}) + "\n" for i, line in enumerate(lines)))
    from_jsonl = train_tokenizer([jsonl], tmp_path / "a.json", TrainConfig(vocab_size=600), text_key="body")
    from_text = train_tokenizer([english_text_file], tmp_path / "b.json", TrainConfig(vocab_size=600))
    assert tokenizer_fingerprint(from_jsonl) == tokenizer_fingerprint(from_text)
