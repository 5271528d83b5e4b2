"""Preprocessing: round trip text -> ids -> megatron-core IndexedDataset -> text, input formats, the split, and
every kind of bad input (one-line DataError naming the file, nothing half-written)."""

from __future__ import annotations

import hashlib
import json
import lzma
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset

from pipeline.errors import DataError
from pipeline.data.meta import check_meta_matches_tokenizer, load_meta, token_dtype
from pipeline.data.preprocess import PreprocessConfig, main, preprocess
from pipeline.data.tokenizer import TrainConfig, load_tokenizer, train_tokenizer

PARAGRAPHS = [
    "The first document has two lines.\nThis is its second line, with ünïcode: €, 日本.",
    "Second document, a single line.",
    "Third document:\n  indented line\nand a last one.",
]


def _decode_split(prefix, split, tokenizer):
    dataset = IndexedDataset(f"{prefix}_{split}")
    return [tokenizer.decode(dataset[i].tolist()) for i in range(len(dataset))]


def _run(tmp_path, inputs, tokenizer, name="out", **overrides):
    settings = dict(valid_fraction=0.0, workers=1, show_progress=False)
    settings.update(overrides)
    prefix = tmp_path / name
    meta = preprocess(PreprocessConfig(inputs=inputs, tokenizer=tokenizer, output_prefix=prefix, **settings))
    return prefix, meta


def _listing(directory: Path) -> list[str]:
    """Every entry under ``directory`` (relative paths), hidden temporaries included."""
    return sorted(str(path.relative_to(directory)) for path in directory.rglob("*"))


def _contents(directory: Path) -> dict[str, bytes]:
    """Relative path -> bytes of every file under ``directory`` (symlinks followed; a dangling one fails)."""
    return {name: (directory / name).read_bytes() for name in _listing(directory) if not (directory / name).is_dir()}


def _dataset_listing(name: str) -> list[str]:
    """What a dataset NAME is on disk: NAME.dataset/ with its five files, and the five names linking into it."""
    files = [f"{name}{suffix}" for suffix in ("_train.bin", "_train.idx", "_valid.bin", "_valid.idx", ".meta.json")]
    return [f"{name}.dataset"] + [f"{name}.dataset/{file}" for file in files] + files


def test_round_trip_text_to_indexed_dataset_decodes_to_source(tiny_dataset_prefix, english_text_file,
                                                              tiny_tokenizer):
    tokenizer = load_tokenizer(tiny_tokenizer)
    source = [line.strip() for line in english_text_file.read_text(encoding="utf-8").splitlines()]
    train = _decode_split(tiny_dataset_prefix, "train", tokenizer)
    valid = _decode_split(tiny_dataset_prefix, "valid", tokenizer)
    # Each document is held out with probability 0.05 (a keyed hash of its ids): 19 of 300 for seed 1234 (the
    # count is Binomial(300, 0.05), mean 15, sd 3.8). Pinned: a change of the split rule shows here.
    assert (len(train), len(valid)) == (281, 19)
    assert sorted(train + valid) == sorted(source)
    # Each split keeps the corpus order.
    remaining = iter(source)
    assert all(any(text == candidate for candidate in remaining) for text in train)  # train is a subsequence

    meta = load_meta(tiny_dataset_prefix)
    dataset = IndexedDataset(f"{tiny_dataset_prefix}_train")
    assert dataset.index.dtype == np.uint16 and meta["dtype"] == "uint16"
    assert meta["splits"]["train"] == {"documents": 281, "tokens": int(dataset.sequence_lengths.sum())}
    assert meta["documents"] == 300 and meta["empty_documents_skipped"] == 0
    assert meta["special_tokens"] == {"bos": 0, "pad": 1, "eos": 2, "unk": 3, "mask": 4}
    assert meta["tokenizer"]["vocab_size"] == 1000
    assert meta["text_bytes"] == english_text_file.stat().st_size
    assert meta["sources"] == [{"path": str(english_text_file.resolve()), "format": "text"}]
    # No special tokens inside documents: packing adds them.
    assert not np.isin(np.concatenate([dataset[i] for i in range(len(dataset))]), [0, 1, 2, 3, 4]).any()


def test_split_is_deterministic_by_seed_and_independent_of_workers(tmp_path, english_text_file, tiny_tokenizer,
                                                                   tiny_dataset_prefix):
    common = dict(one_doc_per_line=True, valid_fraction=0.05)
    again, _ = _run(tmp_path, [english_text_file], tiny_tokenizer, "again", seed=1234, workers=2, **common)
    other, _ = _run(tmp_path, [english_text_file], tiny_tokenizer, "other", seed=99, **common)
    for suffix in ("_train.bin", "_train.idx", "_valid.bin", "_valid.idx"):
        assert Path(f"{again}{suffix}").read_bytes() == Path(f"{tiny_dataset_prefix}{suffix}").read_bytes()
    assert Path(f"{other}_valid.bin").read_bytes() != Path(f"{again}_valid.bin").read_bytes()
    assert len(IndexedDataset(f"{other}_valid")) == 12  # seed 99 draws another set (Binomial(300, 0.05))
    assert _listing(tmp_path) == sorted(_dataset_listing("again") + _dataset_listing("other"))


def test_blank_line_separated_documents_and_xz(tmp_path, tiny_tokenizer):
    text = "\n\n".join(PARAGRAPHS).replace("Second", "\n\n  \nSecond") + "\n\n\n"
    plain = tmp_path / "docs.txt"
    plain.write_text(text, encoding="utf-8")
    compressed = tmp_path / "docs.txt.xz"
    compressed.write_bytes(lzma.compress(text.encode("utf-8")))
    tokenizer = load_tokenizer(tiny_tokenizer)
    for source in (plain, compressed):
        prefix, meta = _run(tmp_path, [source], tiny_tokenizer, name=source.name)
        assert _decode_split(prefix, "train", tokenizer) == PARAGRAPHS
        assert meta["documents"] == 3 and meta["splits"]["valid"]["documents"] == 0
        assert meta["text_bytes"] == len(text.encode("utf-8"))


def test_jsonl_parquet_and_hf_dataset_inputs(tmp_path, tiny_tokenizer):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("".join(json.dumps({"body": text, "id": i}) + "\n" for i, text in enumerate(PARAGRAPHS)) +
                     "\n" + json.dumps({"body": "   "}) + "\n" + json.dumps({"body": None}) + "\n", encoding="utf-8")
    parquet = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"body": PARAGRAPHS + [""], "id": [0, 1, 2, 3]}), parquet)
    hf_directory = tmp_path / "hf"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"body": PARAGRAPHS[:2]}),
                          "test": datasets.Dataset.from_dict({"body": PARAGRAPHS[2:]})}).save_to_disk(hf_directory)
    tokenizer = load_tokenizer(tiny_tokenizer)
    expected_empty = {"docs.jsonl": 2, "docs.parquet": 1, "hf": 0}
    for source in (jsonl, parquet, hf_directory):
        prefix, meta = _run(tmp_path, [source], tiny_tokenizer, name=f"out-{source.name}", text_key="body")
        assert _decode_split(prefix, "train", tokenizer) == PARAGRAPHS, source
        assert meta["empty_documents_skipped"] == expected_empty[source.name]
    with pytest.raises(DataError, match=r"docs.parquet: no column 'text'"):
        _run(tmp_path, [parquet], tiny_tokenizer, name="bad")
    with pytest.raises(DataError, match=r"hf: no column 'text'"):
        _run(tmp_path, [hf_directory], tiny_tokenizer, name="bad")
    with pytest.raises(DataError, match=r"docs.jsonl:1: no 'text' field"):
        _run(tmp_path, [jsonl], tiny_tokenizer, name="bad")
    assert not list(tmp_path.glob("bad*"))


def test_several_inputs_and_globs_are_concatenated_in_order(tmp_path, tiny_tokenizer):
    for i, text in enumerate(PARAGRAPHS):
        (tmp_path / f"part{i}.txt").write_text(text + "\n", encoding="utf-8")
    prefix, meta = _run(tmp_path, [tmp_path / "part0.txt", str(tmp_path / "part[12].txt")], tiny_tokenizer)
    assert _decode_split(prefix, "train", load_tokenizer(tiny_tokenizer)) == PARAGRAPHS
    assert [Path(source["path"]).name for source in meta["sources"]] == ["part0.txt", "part1.txt", "part2.txt"]


def test_token_dtype_is_the_smallest_that_fits():
    assert token_dtype(1000) is np.uint16 and token_dtype(65499) is np.uint16
    assert token_dtype(65500) is np.int32 and token_dtype(250_000) is np.int32


# ---------------------------------------------------------------------------------------------------------------
# Bad input


def test_nonexistent_and_empty_inputs(tmp_path, tiny_tokenizer):
    with pytest.raises(DataError, match=r"missing.txt: input not found"):
        _run(tmp_path, [tmp_path / "missing.txt"], tiny_tokenizer)
    with pytest.raises(DataError, match=r"nothing-\*.txt: no input file matches"):
        _run(tmp_path, [str(tmp_path / "nothing-*.txt")], tiny_tokenizer)
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    with pytest.raises(DataError, match=r"empty.txt: input file is empty"):
        _run(tmp_path, [empty], tiny_tokenizer)
    blank = tmp_path / "blank.txt"
    blank.write_text("\n   \n\n")
    with pytest.raises(DataError, match=r"blank.txt: no non-empty documents \(3 empty skipped\)"):
        _run(tmp_path, [blank], tiny_tokenizer, one_doc_per_line=True)
    assert _listing(tmp_path) == ["blank.txt", "empty.txt"]


def test_invalid_utf8_names_file_and_byte_offset(tmp_path, tiny_tokenizer):
    good = tmp_path / "good.txt"
    good.write_text("\n".join(PARAGRAPHS) + "\n", encoding="utf-8")
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"first line\nsecond \xff line\n")
    with pytest.raises(DataError, match=r"bad.txt: invalid UTF-8 at byte 18; pass --replace-invalid"):
        _run(tmp_path, [good, bad], tiny_tokenizer, one_doc_per_line=True)
    assert _listing(tmp_path) == ["bad.txt", "good.txt"]  # the good file was tokenized, nothing was kept


def test_replace_invalid_counts_and_warns(tmp_path, tiny_tokenizer, capsys):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"first \xc3 line\nsecond \xff\xfe line \xef\xbf\xbd kept\n")
    prefix, meta = _run(tmp_path, [bad], tiny_tokenizer, one_doc_per_line=True, replace_invalid=True)
    assert meta["invalid_utf8_replaced"] == 3  # the genuine U+FFFD of the input is not counted
    assert f"warning: replaced 3 invalid UTF-8 sequences with U+FFFD in {bad} (3)" in capsys.readouterr().err
    assert _decode_split(prefix, "train", load_tokenizer(tiny_tokenizer)) == [
        "first \ufffd line", "second \ufffd\ufffd line \ufffd kept"]


def test_utf8_byte_order_mark_is_not_text(tmp_path, tiny_tokenizer):
    source = tmp_path / "bom.txt"
    source.write_bytes(b"\xef\xbb\xbffirst\nsecond\n")
    prefix, _ = _run(tmp_path, [source], tiny_tokenizer, one_doc_per_line=True)
    assert _decode_split(prefix, "train", load_tokenizer(tiny_tokenizer)) == ["first", "second"]


def test_empty_documents_are_skipped_and_counted(tmp_path, tiny_tokenizer):
    source = tmp_path / "docs.txt"
    source.write_text("one\n\n  \ntwo\n\nthree\n", encoding="utf-8")
    prefix, meta = _run(tmp_path, [source], tiny_tokenizer, one_doc_per_line=True)
    assert meta["empty_documents_skipped"] == 3 and meta["documents"] == 3
    assert _decode_split(prefix, "train", load_tokenizer(tiny_tokenizer)) == ["one", "two", "three"]


def test_bad_jsonl_line_is_named(tmp_path, tiny_tokenizer):
    source = tmp_path / "docs.jsonl"
    source.write_text('{"text": "fine"}\n{"text": broken\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"docs.jsonl:2: invalid JSON"):
        _run(tmp_path, [source], tiny_tokenizer)
    source.write_text('{"text": 42}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"docs.jsonl: line 1: 'text' is a int, expected a string"):
        _run(tmp_path, [source], tiny_tokenizer)


def test_meta_vocab_must_match_tokenizer(tmp_path, english_text_file, tiny_tokenizer, tiny_dataset_prefix):
    meta = check_meta_matches_tokenizer(tiny_dataset_prefix, tiny_tokenizer)
    assert meta["tokenizer"]["vocab_size"] == 1000
    smaller = train_tokenizer([english_text_file], tmp_path / "small.json", TrainConfig(vocab_size=600))
    with pytest.raises(DataError, match=r"lee.meta.json: dataset vocab size 1000 differs from tokenizer .*small.json "
                                        r"\(600\)"):
        check_meta_matches_tokenizer(tiny_dataset_prefix, smaller)
    # Same size and special ids, different merges: caught by the fingerprint.
    retrained = train_tokenizer([english_text_file], tmp_path / "other.json",
                                TrainConfig(vocab_size=1000, lowercase=True))
    with pytest.raises(DataError, match=r"lee.meta.json: dataset was tokenized with a different tokenizer.json"):
        check_meta_matches_tokenizer(tiny_dataset_prefix, retrained)
    with pytest.raises(DataError, match=r"nowhere.meta.json: dataset metadata not found"):
        load_meta(tmp_path / "nowhere")
    (tmp_path / "broken.meta.json").write_text("{")
    with pytest.raises(DataError, match=r"broken.meta.json: not a valid dataset metadata file"):
        load_meta(tmp_path / "broken")
    (tmp_path / "listed.meta.json").write_text("[1, 2]")
    with pytest.raises(DataError, match=r"listed.meta.json: not a valid dataset metadata file \(expected a JSON "
                                        r"object, got list\)"):
        load_meta(tmp_path / "listed")


def test_failure_late_leaves_previous_dataset_untouched(tmp_path, english_text_file, tiny_tokenizer, monkeypatch):
    import pipeline.data.preprocess as preprocess_module

    prefix, _ = _run(tmp_path, [english_text_file], tiny_tokenizer, one_doc_per_line=True, valid_fraction=0.1)
    before = _contents(tmp_path)

    def crash(*args, **kwargs):
        raise RuntimeError("disk full")

    # Fails after both splits were written to temporary files, just before meta.json.
    monkeypatch.setattr(preprocess_module, "tokenizer_fingerprint", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        _run(tmp_path, [english_text_file], tiny_tokenizer, one_doc_per_line=True, valid_fraction=0.5)
    assert _contents(tmp_path) == before and _listing(tmp_path) == sorted(_dataset_listing("out"))


def test_cli_prints_one_error_line_and_exits_1(tmp_path, tiny_tokenizer):
    environment = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    result = subprocess.run(
        [sys.executable, "-m", "pipeline", "preprocess", "--input", str(tmp_path / "missing.txt"), "--tokenizer",
         str(tiny_tokenizer), "--output-prefix", str(tmp_path / "out"), "--quiet"],
        capture_output=True, text=True, env=environment, timeout=120)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == f"error: {tmp_path / 'missing.txt'}: input not found"
    assert "Traceback" not in result.stderr


def test_cli_writes_dataset(tmp_path, english_text_file, tiny_tokenizer, capsys):
    prefix = tmp_path / "cli"
    assert main(["--input", str(english_text_file), "--tokenizer", str(tiny_tokenizer), "--output-prefix",
                 str(prefix), "--one-doc-per-line", "--valid-fraction", "0.1", "--workers", "2", "--quiet"]) == 0
    assert "train 267 documents" in capsys.readouterr().out
    assert load_meta(prefix)["splits"]["valid"]["documents"] == 33  # Binomial(300, 0.1): mean 30, sd 5.2


def test_long_documents_are_tokenized_in_pieces_with_identical_ids(english_text_file, tiny_tokenizer):
    from pipeline.data.preprocess import _init_worker, _tokenize_chunk, split_for_tokenization
    from pipeline.data.tokenizer import load_raw_tokenizer

    text = english_text_file.read_text(encoding="utf-8")
    documents = [text, "short", text.replace("\n", " "), text.replace(" ", "\u00a0")]  # the last has no safe cut
    pieces = [split_for_tokenization(document) for document in documents]
    assert [len(split) > 10 for split in pieces] == [True, False, True, False]
    assert ["".join(split) for split in pieces] == documents
    _init_worker(str(tiny_tokenizer), "uint16")
    tokens, lengths = _tokenize_chunk(documents)
    tokenizer = load_raw_tokenizer(tiny_tokenizer)
    expected = [tokenizer.encode(document, add_special_tokens=False).ids for document in documents]
    assert lengths.tolist() == [len(ids) for ids in expected]
    assert tokens.tolist() == [token for ids in expected for token in ids]


def test_damaged_compressed_input_is_named(tmp_path, tiny_tokenizer):
    data = lzma.compress(("\n".join(PARAGRAPHS) * 200).encode("utf-8"))
    damaged = tmp_path / "cut.txt.xz"
    damaged.write_bytes(data[:len(data) // 2])
    with pytest.raises(DataError, match=r"cut.txt.xz: cannot read \(Compressed file ended"):
        _run(tmp_path, [damaged], tiny_tokenizer, one_doc_per_line=True)
    not_gzip = tmp_path / "plain.txt.gz"
    not_gzip.write_text("not gzip at all")
    with pytest.raises(DataError, match=r"plain.txt.gz: cannot read"):
        _run(tmp_path, [not_gzip], tiny_tokenizer)
    assert _listing(tmp_path) == ["cut.txt.xz", "plain.txt.gz"]


def test_rewriting_a_dataset_drops_its_stale_packing_indices(tmp_path, english_text_file, tiny_tokenizer):
    from pipeline.data.dataset import PackedSequences
    from pipeline.data.tokenizer import special_tokens

    special = special_tokens(load_tokenizer(tiny_tokenizer))
    prefix, _ = _run(tmp_path, [english_text_file], tiny_tokenizer, valid_fraction=0.1, one_doc_per_line=True)
    first = PackedSequences(f"{prefix}_train", 64, special, seed=1)
    (cached,) = [path for path in tmp_path.iterdir() if ".packed-L64-" in path.name]
    _run(tmp_path, [english_text_file], tiny_tokenizer, valid_fraction=0.1, one_doc_per_line=True)
    assert not cached.exists()
    second = PackedSequences(f"{prefix}_train", 64, special, seed=1)
    np.testing.assert_array_equal(first.get(0, 0), second.get(0, 0))  # same text, same packing


@pytest.mark.parametrize("dtype", [np.uint16, np.int32])
def test_bulk_add_documents_writes_what_add_document_per_document_writes(tmp_path, dtype):
    from pipeline.data.meta import import_indexed_dataset_module
    from pipeline.data.preprocess import add_documents

    builder_class = import_indexed_dataset_module().IndexedDatasetBuilder
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 40, size=500)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    flat = rng.integers(0, 30000, size=int(offsets[-1])).astype(dtype)
    documents = np.flatnonzero(rng.random(500) < 0.7)  # runs of consecutive documents and gaps
    written = {}
    for name in ("one_by_one", "bulk"):
        builder = builder_class(str(tmp_path / f"{name}.bin"), dtype=dtype)
        if name == "bulk":
            add_documents(builder, flat, offsets, lengths, documents, max_block_tokens=7)  # blocks cut runs too
        else:
            for document in documents:
                builder.add_document(flat[offsets[document]:offsets[document + 1]], [int(lengths[document])])
        builder.finalize(str(tmp_path / f"{name}.idx"))
        written[name] = ((tmp_path / f"{name}.bin").read_bytes(), (tmp_path / f"{name}.idx").read_bytes())
    assert written["bulk"] == written["one_by_one"]
    dataset = IndexedDataset(str(tmp_path / "bulk"))
    assert len(dataset) == documents.size and np.array_equal(dataset[3], flat[offsets[documents[3]]:
                                                                               offsets[documents[3] + 1]])


def test_valid_split_is_a_keyed_hash_of_each_documents_ids():
    from pipeline.data.preprocess import valid_document_hashes, valid_document_mask

    rng = np.random.default_rng(0)
    lengths = rng.integers(0, 50, size=100_000)
    tokens = rng.integers(0, 60_000, size=int(lengths.sum()))
    hashes = valid_document_hashes(tokens.astype(np.uint16), lengths, seed=1234)
    # Independent of the stored dtype and of how documents are chunked (by workers, shards).
    assert np.array_equal(valid_document_hashes(tokens.astype(np.int32), lengths, seed=1234), hashes)
    cut = int(lengths[:777].sum())
    assert np.array_equal(np.concatenate([valid_document_hashes(tokens[:cut], lengths[:777], 1234),
                                          valid_document_hashes(tokens[cut:], lengths[777:], 1234)]), hashes)
    # Pinned: BLAKE2b-64 keyed by the seed over the ids as little-endian uint32.
    assert valid_document_hashes(np.array([5, 6, 7]), np.array([3]), seed=1234)[0] == int.from_bytes(
        hashlib.blake2b(np.array([5, 6, 7], "<u4").tobytes(), digest_size=8,
                        key=(1234).to_bytes(8, "little", signed=True)).digest(), "little")
    assert not np.array_equal(valid_document_hashes(tokens, lengths, seed=99), hashes)

    non_empty = lengths > 0
    for fraction in (0.01, 0.1, 0.5):
        is_valid = valid_document_mask(hashes, non_empty, fraction, keep_both_splits=True)
        assert not is_valid[~non_empty].any()
        n = int(non_empty.sum())  # the valid count is Binomial(n, fraction): within 4 sd
        assert abs(int(is_valid.sum()) - fraction * n) <= 4 * (n * fraction * (1 - fraction)) ** 0.5
    assert not valid_document_mask(hashes, non_empty, 0.0, keep_both_splits=True).any()

    # Tiny corpora: a whole run keeps both splits non-empty (the smallest / largest hash moves); a shard does not.
    two = np.array([2 ** 63, 2 ** 62], dtype=np.uint64)
    assert valid_document_mask(two, np.ones(2, bool), 0.01, keep_both_splits=True).tolist() == [False, True]
    assert valid_document_mask(two, np.ones(2, bool), 0.99, keep_both_splits=True).tolist() == [False, True]
    assert valid_document_mask(two, np.ones(2, bool), 0.01, keep_both_splits=False).tolist() == [False, False]
    assert valid_document_mask(two[:1], np.ones(1, bool), 0.5, keep_both_splits=True).tolist() == [False]
