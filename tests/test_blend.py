"""Weighted blends (``--data-prefix 0.5 A 0.3 B 0.2 C``): per-source counts follow the weights, the samples do not
depend on the number of ranks or on a resume, and bad weights / prefixes are one-line errors."""

import numpy as np
import pytest

from pipeline.data.batch import SpecialTokens
from pipeline.data.blend import BLEND_PERIOD, BlendIndex, build_blended_dataloader, parse_data_prefix
from pipeline.data.masking import MaskingConfig
from pipeline.data.synthetic import write_synthetic_split
from pipeline.errors import DataError

SPECIAL = SpecialTokens(bos=0, pad=1, eos=2, unk=3, mask=4)
MASKING = MaskingConfig(rate=0.4, strategy="80-10-10", seed=7)
# Each corpus draws its tokens from its own id range, so a sample shows which corpus it came from.
RANGES = {"wiki": (5, 100), "books": (100, 200), "web": (200, 300)}


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    directory = tmp_path_factory.mktemp("blend")
    for number, (name, (low, high)) in enumerate(RANGES.items()):
        for split in ("train", "valid"):
            write_synthetic_split(directory / f"{name}_{split}", 20_000 + 7_000 * number, vocab_size=high,
                                  first_id=low, mean_document_tokens=200, seed=number)
    return directory


def _source_of(input_ids: np.ndarray) -> str:
    content = input_ids[(input_ids >= 5)]
    names = {name for name, (low, high) in RANGES.items() if ((content >= low) & (content < high)).mean() > 0.7}
    assert len(names) == 1
    return names.pop()


def _loader(corpora, consumed, total, dp_rank=0, dp_size=1, workers=0, micro_batch_size=8):
    sources = parse_data_prefix(["0.5", str(corpora / "wiki"), "0.3", str(corpora / "books"), "0.2",
                                 str(corpora / "web")])
    return build_blended_dataloader(sources, "train", 32, MASKING, SPECIAL, 300, micro_batch_size, dp_rank, dp_size,
                                    consumed, workers, seed=5, total_samples=total)


def test_per_source_counts_follow_the_weights(corpora):
    loader = _loader(corpora, 0, 10_000, micro_batch_size=200)
    counts = loader.dataset.source_counts(10_000)
    assert counts == {"wiki": 5000, "books": 3000, "web": 2000}
    seen = {name: 0 for name in RANGES}
    for batch in loader:
        for ids in batch["labels"].where(batch["labels"] >= 0, batch["input_ids"]).numpy():
            seen[_source_of(ids)] += 1
    # Counted from the tokens themselves (the corpora are several epochs deep at these weights).
    for name, weight in (("wiki", 0.5), ("books", 0.3), ("web", 0.2)):
        assert abs(seen[name] / 10_000 - weight) < 0.01, seen
    # The pattern repeats every period: later counts still follow the weights.
    later = loader.dataset.index.source_counts(3 * BLEND_PERIOD + 12_345)
    np.testing.assert_allclose(later / later.sum(), [0.5, 0.3, 0.2], atol=1e-5)


def _all_batches(loader):
    return [batch["input_ids"].numpy().copy() for batch in loader], [batch["labels"].numpy().copy() for batch in loader]


def test_same_samples_on_one_and_two_ranks_and_after_a_resume(corpora):
    total = 640
    one_ids, one_labels = _all_batches(_loader(corpora, 0, total))
    rank0 = _all_batches(_loader(corpora, 0, total, dp_rank=0, dp_size=2, micro_batch_size=4))
    rank1 = _all_batches(_loader(corpora, 0, total, dp_rank=1, dp_size=2, micro_batch_size=4, workers=2))
    two_ids = [np.concatenate([a, b]) for a, b in zip(rank0[0], rank1[0])]
    two_labels = [np.concatenate([a, b]) for a, b in zip(rank0[1], rank1[1])]
    assert len(two_ids) == len(one_ids) == total // 8
    for a, b, c, d in zip(one_ids, two_ids, one_labels, two_labels):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(c, d)
    resumed_ids, resumed_labels = _all_batches(_loader(corpora, 400, total, workers=2))
    for a, b in zip(one_ids[50:], resumed_ids):
        np.testing.assert_array_equal(a, b)
    assert len(resumed_ids) == len(one_ids) - 50
    np.testing.assert_array_equal(np.concatenate(one_labels[50:]), np.concatenate(resumed_labels))


@pytest.mark.parametrize("values, message", [
    (["0.5", "wiki", "0", "books"], "weight 0 of books must be > 0"),
    (["0.5", "wiki", "books"], "expected one prefix or pairs WEIGHT PREFIX"),
    (["half", "wiki", "0.5", "books"], r"'half' \(before wiki\) is not a weight"),
    (["0.5", "wiki", "0.5", "wiki"], "a prefix is given twice"),
    (["0.5", "a/wiki", "0.5", "b/wiki"], "two sources share the name"),
])
def test_bad_weights_are_one_line_errors(values, message):
    with pytest.raises(DataError, match=message) as caught:
        parse_data_prefix(values)
    assert "\n" not in str(caught.value)


def test_missing_prefix_is_a_one_line_error(corpora):
    sources = parse_data_prefix(["0.7", str(corpora / "wiki"), "0.3", str(corpora / "nowhere")])
    with pytest.raises(DataError, match=r"nowhere\.meta\.json: data prefix .*nowhere not found") as caught:
        build_blended_dataloader(sources, "train", 32, MASKING, SPECIAL, 300, 4, 0, 1, 0, 0, 5, 100)
    assert "\n" not in str(caught.value)


def test_one_prefix_is_the_single_corpus_case(corpora, tmp_path):
    assert parse_data_prefix([str(corpora / "wiki")]) == [(1.0, str(corpora / "wiki"))]
    assert parse_data_prefix(["2", "a", "6", "b"]) == [(0.25, "a"), (0.75, "b")]
    index = BlendIndex([1.0], None, build=False)
    assert index.locate(12_345_678) == (0, 12_345_678)
    assert index.source_counts(99).tolist() == [99]


def test_training_on_a_blend_logs_per_source_counts_and_validation(tmp_path, tiny_dataset_prefix, tiny_tokenizer,
                                                                   english_text_file):
    """Two ranks train on 0.7 lee + 0.3 half (the first 150 Lee documents, preprocessed on their own)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from train_launch import read_metrics, run, tiny_args

    from pipeline.data.preprocess import PreprocessConfig, preprocess

    half_text = tmp_path / "half.txt"
    half_text.write_text("\n".join(english_text_file.read_text(encoding="utf-8").splitlines()[:150]) + "\n")
    half = tmp_path / "data" / "half"
    preprocess(PreprocessConfig(inputs=[half_text], tokenizer=tiny_tokenizer, output_prefix=half,
                                one_doc_per_line=True, valid_fraction=0.05, workers=1, show_progress=False))
    run_dir = tmp_path / "run"
    args = tiny_args(f"0.7 {tiny_dataset_prefix} 0.3 {half}", str(tiny_tokenizer), run_dir, train_steps=4,
                     eval_interval=2, index_dir=str(tmp_path / "indices"))
    run(args, tmp_path / "logs", nproc=2, timeout=900)
    train = read_metrics(run_dir)
    assert [record["step"] for record in train] == [1, 2, 3, 4]
    for record in train:
        assert record["samples_lee"] + record["samples_half"] == record["consumed_samples"]
        assert abs(record["samples_lee"] - 0.7 * record["consumed_samples"]) <= 1
    evals = read_metrics(run_dir, "eval")
    assert [record["step"] for record in evals] == [0, 2, 4]
    for record in evals:
        assert record["loss"] == pytest.approx(0.7 * record["loss_lee"] + 0.3 * record["loss_half"])
        assert record["loss_lee"] != record["loss_half"]
        assert record["ppl_masked"] > 1.0  # per corruption kind, blended by the same weights
    indices = sorted(path.name for path in (tmp_path / "indices").iterdir())
    assert len([name for name in indices if name.startswith("blend-")]) == 1
    assert not [name for name in indices if ".tmp-" in name]
