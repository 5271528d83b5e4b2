"""Sharded preprocessing (``preprocess --shard I/N``) and ``merge``: the merged dataset holds exactly the documents
of one run over the same inputs, with the valid fraction kept; shards of different tokenizers are refused."""

import subprocess
import sys

import numpy as np
import pytest

from pipeline.data.merge import main as merge_main
from pipeline.data.meta import import_indexed_dataset_module, load_meta, split_prefix
from pipeline.data.preprocess import PreprocessConfig, preprocess, shard_prefix
from pipeline.errors import DataError

VALID_FRACTION = 0.1


@pytest.fixture(scope="module")
def input_files(tmp_path_factory, english_text_file):
    """The Lee corpus (300 documents, one per line) cut into 5 files of unequal size."""
    directory = tmp_path_factory.mktemp("lee_parts")
    lines = english_text_file.read_text(encoding="utf-8").splitlines()
    paths = []
    for number, (start, end) in enumerate([(0, 40), (40, 110), (110, 170), (170, 260), (260, len(lines))]):
        path = directory / f"part{number}.txt"
        path.write_text("\n".join(lines[start:end]) + "\n", encoding="utf-8")
        paths.append(path)
    return paths


def _run(inputs, tokenizer, prefix, shard=None, seed=1234):
    return preprocess(PreprocessConfig(inputs=[str(path) for path in inputs], tokenizer=tokenizer,
                                       output_prefix=prefix, one_doc_per_line=True, valid_fraction=VALID_FRACTION,
                                       seed=seed, workers=1, show_progress=False, shard=shard))


def _documents(prefix, split):
    dataset = import_indexed_dataset_module().IndexedDataset(split_prefix(prefix, split))
    return [tuple(np.asarray(dataset[i]).tolist()) for i in range(len(dataset))]


def test_three_shards_merged_hold_the_documents_of_one_run(tmp_path, input_files, tiny_tokenizer):
    single = _run(input_files, tiny_tokenizer, tmp_path / "single" / "lee")
    for index in range(3):
        meta = _run(input_files, tiny_tokenizer, tmp_path / "sharded" / "lee", shard=(index, 3))
        assert meta["shard"] == [index, 3]
    assert merge_main(["--output-prefix", str(tmp_path / "sharded" / "lee"), "--shards", "3"]) == 0
    merged = load_meta(tmp_path / "sharded" / "lee")

    one_run = {split: _documents(tmp_path / "single" / "lee", split) for split in ("train", "valid")}
    joined = {split: _documents(tmp_path / "sharded" / "lee", split) for split in ("train", "valid")}
    # The same documents (token ids) in the same order, in the same split: the valid set is a function of each
    # document's ids and the seed, not of the run that tokenized it.
    assert joined["train"] == one_run["train"] and joined["valid"] == one_run["valid"]
    assert len(joined["train"]) + len(joined["valid"]) == single["documents"] == merged["documents"] == 300
    # The valid fraction is kept in expectation: the count is Binomial(300, 0.1) (mean 30, sd 5.2).
    assert abs(len(joined["valid"]) - VALID_FRACTION * 300) <= 3 * (300 * VALID_FRACTION * (1 - VALID_FRACTION)) ** 0.5
    assert merged["splits"] == single["splits"]
    assert merged["splits"]["valid"]["documents"] == len(joined["valid"])
    assert merged["tokens"] == single["tokens"] and merged["max_token_id"] == single["max_token_id"]
    assert merged["tokenizer"]["sha256"] == single["tokenizer"]["sha256"]
    assert [source["path"] for source in merged["sources"]] == [str(path.resolve()) for path in input_files]

    # Shards listed out of order are merged in shard order (the order of the single run).
    shards = [shard_prefix(tmp_path / "sharded" / "lee", index, 3) for index in (2, 0, 1)]
    assert merge_main(["--output-prefix", str(tmp_path / "reordered" / "lee"), "--input", *shards]) == 0
    assert _documents(tmp_path / "reordered" / "lee", "train") == one_run["train"]


def test_merge_refuses_shards_of_different_tokenizers(tmp_path, input_files, tiny_tokenizer, english_text_file):
    from pipeline.data.tokenizer import TrainConfig, train_tokenizer

    other = train_tokenizer([english_text_file], tmp_path / "other" / "tokenizer.json",
                            TrainConfig(vocab_size=800, min_frequency=2))
    _run(input_files, tiny_tokenizer, tmp_path / "lee", shard=(0, 2))
    _run(input_files, other, tmp_path / "lee", shard=(1, 2))
    with pytest.raises(DataError, match=r"lee-shard-00001-of-00002\.meta\.json: made with a different tokenizer"):
        merge_main(["--output-prefix", str(tmp_path / "lee"), "--shards", "2"])
    assert not (tmp_path / "lee.meta.json").exists() and not list(tmp_path.glob(".lee.dataset.tmp-*"))


def test_merge_refuses_shards_split_with_different_seeds(tmp_path, input_files, tiny_tokenizer):
    _run(input_files, tiny_tokenizer, tmp_path / "lee", shard=(0, 2))
    _run(input_files, tiny_tokenizer, tmp_path / "lee", shard=(1, 2), seed=99)
    with pytest.raises(DataError, match=r"lee-shard-00001-of-00002\.meta\.json: seed 99 differs from .*1234"):
        merge_main(["--output-prefix", str(tmp_path / "lee"), "--shards", "2"])


def test_missing_shard_and_bad_shard_argument_are_one_line_errors(tmp_path, input_files, tiny_tokenizer):
    _run(input_files, tiny_tokenizer, tmp_path / "lee", shard=(0, 2))
    with pytest.raises(DataError, match=r"lee-shard-00001-of-00002\.meta\.json: shard missing \(1 of 2"):
        merge_main(["--output-prefix", str(tmp_path / "lee"), "--shards", "2"])
    with pytest.raises(DataError, match="only 5 input files"):
        _run(input_files, tiny_tokenizer, tmp_path / "many", shard=(0, 6))
    result = subprocess.run([sys.executable, "-m", "pipeline", "preprocess", "--input", str(input_files[0]),
                             "--tokenizer", str(tiny_tokenizer), "--output-prefix", str(tmp_path / "x"),
                             "--shard", "3/3"], capture_output=True, text=True)
    assert result.returncode != 0 and "shard must be I/N with 0 <= I < N, got 3/3" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_shard_prefix_names():
    assert shard_prefix("data/web", 3, 16) == "data/web-shard-00003-of-00016"
