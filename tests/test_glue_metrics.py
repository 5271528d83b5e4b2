"""GLUE metrics against hand-computed values and against scikit-learn / scipy (including degenerate cases), the GLUE TSV layouts of every task,
generic CSV/TSV/JSONL files, and clear errors for bad inputs."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import scipy.stats
import sklearn.metrics

from pipeline.evaluation import glue
from pipeline.evaluation.glue import GlueDataError

# ------------------------------------------------------------------------------------------------- metrics


def test_accuracy_and_f1_hand_computed():
    predictions = [1, 1, 0, 0, 1, 0]
    labels = [1, 0, 0, 1, 1, 0]
    # TP = 2 (positions 0, 4), FP = 1 (pos 1), FN = 1 (pos 3), TN = 2.
    assert glue.accuracy(predictions, labels) == pytest.approx(4 / 6)
    assert glue.f1_binary(predictions, labels) == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))


def test_f1_degenerate():
    # No positives predicted, some positive labels: precision undefined, F1 = 0.
    assert glue.f1_binary([0, 0, 0], [1, 0, 1]) == 0.0
    # No positives anywhere: 0 by convention (no division by zero).
    assert glue.f1_binary([0, 0], [0, 0]) == 0.0
    assert glue.f1_binary([1, 1], [1, 1]) == 1.0


def test_matthews_binary_hand_computed():
    predictions = [1, 1, 0, 0, 1, 0]
    labels = [1, 0, 0, 1, 1, 0]
    tp, tn, fp, fn = 2, 2, 1, 1
    expected = (tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    assert glue.matthews_corrcoef(predictions, labels) == pytest.approx(expected)  # 1/3
    assert glue.matthews_corrcoef(labels, labels) == pytest.approx(1.0)
    assert glue.matthews_corrcoef([1 - value for value in labels], labels) == pytest.approx(-1.0)


def test_matthews_multiclass_hand_computed():
    # Confusion (rows true, cols predicted) for labels [0,0,1,1,2,2], predictions [0,1,1,1,2,0]:
    # [[1,1,0],[0,2,0],[1,0,1]]: c = 4, s = 6, t = [2,2,2], p = [2,3,1].
    predictions = [0, 1, 1, 1, 2, 0]
    labels = [0, 0, 1, 1, 2, 2]
    numerator = 4 * 6 - (2 * 2 + 2 * 3 + 2 * 1)
    denominator = math.sqrt((36 - (4 + 9 + 1)) * (36 - (4 + 4 + 4)))
    assert glue.matthews_corrcoef(predictions, labels) == pytest.approx(numerator / denominator)


def test_matthews_degenerate_is_zero():
    assert glue.matthews_corrcoef([1, 1, 1, 1], [0, 1, 0, 1]) == 0.0  # constant predictions
    assert glue.matthews_corrcoef([0, 1, 0, 1], [1, 1, 1, 1]) == 0.0  # constant labels
    assert glue.matthews_corrcoef([1], [1]) == 0.0


def test_pearson_spearman_hand_computed():
    predictions = [1.0, 2.0, 3.0, 4.0]
    labels = [2.0, 4.0, 5.0, 9.0]
    # Pearson by hand: x - mean = [-1.5, -.5, .5, 1.5], y - mean = [-3, -1, 0, 4].
    sxy = 4.5 + 0.5 + 0 + 6.0
    expected = sxy / math.sqrt((2.25 + 0.25 + 0.25 + 2.25) * (9 + 1 + 0 + 16))
    assert glue.pearson(predictions, labels) == pytest.approx(expected)
    # Monotone: Spearman 1; with a tie, ranks are averaged: [1, 2.5, 2.5, 4] vs [1, 2, 3, 4].
    assert glue.spearman(predictions, labels) == pytest.approx(1.0)
    tied = glue.spearman([1.0, 2.0, 2.0, 3.0], [1.0, 2.0, 3.0, 4.0])
    assert tied == pytest.approx(glue.pearson([1, 2.5, 2.5, 4], [1, 2, 3, 4]))
    assert glue.spearman([4.0, 3.0, 2.0, 1.0], labels) == pytest.approx(-1.0)


def test_correlation_degenerate_is_zero_not_nan():
    assert glue.pearson([2.0, 2.0, 2.0], [1.0, 2.0, 3.0]) == 0.0
    assert glue.spearman([2.0, 2.0, 2.0], [1.0, 2.0, 3.0]) == 0.0
    assert glue.pearson([1.0], [5.0]) == 0.0


RANDOM_CASES = [(seed, size) for seed in range(6) for size in (2, 3, 17, 200)]


@pytest.mark.filterwarnings("ignore:A single label was found")  # the reference call on one-class inputs
@pytest.mark.parametrize("seed,size", RANDOM_CASES)
def test_classification_metrics_equal_scikit_learn_on_random_inputs(seed, size):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, size)
    predictions = rng.integers(0, 2, size)
    assert glue.f1_binary(predictions, labels) == pytest.approx(
        sklearn.metrics.f1_score(labels, predictions, zero_division=0.0), abs=1e-12)
    assert glue.matthews_corrcoef(predictions, labels) == pytest.approx(
        sklearn.metrics.matthews_corrcoef(labels, predictions), abs=1e-12)
    # Three classes (MNLI's label count).
    labels3, predictions3 = rng.integers(0, 3, size), rng.integers(0, 3, size)
    assert glue.matthews_corrcoef(predictions3, labels3) == pytest.approx(
        sklearn.metrics.matthews_corrcoef(labels3, predictions3), abs=1e-12)
    assert glue.accuracy(predictions3, labels3) == pytest.approx(
        sklearn.metrics.accuracy_score(labels3, predictions3), abs=1e-12)


@pytest.mark.parametrize("seed,size", RANDOM_CASES)
def test_correlations_equal_scipy_on_random_inputs(seed, size):
    rng = np.random.default_rng(seed)
    labels = rng.uniform(0, 5, size)
    predictions = labels + rng.normal(0, 2.0, size)
    assert glue.pearson(predictions, labels) == pytest.approx(
        scipy.stats.pearsonr(predictions, labels).statistic, abs=1e-12)
    assert glue.spearman(predictions, labels) == pytest.approx(
        scipy.stats.spearmanr(predictions, labels).statistic, abs=1e-12)
    # STS-B labels have many ties (scores on a 0.2 grid): ranks are averaged as scipy does.
    tied_labels = np.round(labels * 5) / 5
    tied_predictions = np.round(predictions)
    if len(set(tied_predictions)) > 1 and len(set(tied_labels)) > 1:
        assert glue.spearman(tied_predictions, tied_labels) == pytest.approx(
            scipy.stats.spearmanr(tied_predictions, tied_labels).statistic, abs=1e-12)


@pytest.mark.filterwarnings("ignore:A single label was found")  # the reference call on one-class inputs
@pytest.mark.parametrize("predictions,labels", [
    ([1, 1, 1, 1], [0, 1, 0, 1]),  # constant predictions
    ([0, 1, 0, 1], [1, 1, 1, 1]),  # constant labels
    ([0, 0, 0], [0, 0, 0]),  # no positives anywhere
    ([1], [1]),
    ([0], [1]),
])
def test_degenerate_classification_is_zero_as_documented_and_as_scikit_learn(predictions, labels):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the library path must not warn either
        mcc = glue.matthews_corrcoef(predictions, labels)
        f1 = glue.f1_binary(predictions, labels)
    assert mcc == 0.0 == sklearn.metrics.matthews_corrcoef(labels, predictions)
    expected_f1 = sklearn.metrics.f1_score(labels, predictions, zero_division=0.0)
    assert f1 == expected_f1
    if not any(predictions) and not any(labels):
        assert f1 == 0.0


@pytest.mark.parametrize("predictions,labels", [
    ([2.0, 2.0, 2.0], [1.0, 2.0, 3.0]),  # constant predictions: scipy gives nan and a warning
    ([1.0, 2.0, 3.0], [0.1, 0.1, 0.1]),  # constant labels
    ([3.0], [5.0]),  # one value: scipy raises
])
def test_degenerate_correlations_are_zero_where_scipy_gives_nan(predictions, labels):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert glue.pearson(predictions, labels) == 0.0
        assert glue.spearman(predictions, labels) == 0.0
    if len(predictions) >= 2:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert math.isnan(scipy.stats.pearsonr(predictions, labels).statistic)


def test_correlations_of_a_diverged_run_are_nan():
    # A regression run whose predictions overflowed: nan, which run selection (rank_key) ranks last.
    assert math.isnan(glue.pearson([1.0, float("nan"), 2.0], [1.0, 2.0, 3.0]))
    assert math.isnan(glue.spearman([1.0, float("inf"), 2.0], [1.0, 2.0, 3.0]))


def test_f1_treats_every_other_label_as_negative():
    # The positive class against the rest: label 2 counts as negative, like 0.
    assert glue.f1_binary([1, 2, 0, 1], [1, 0, 2, 0]) == pytest.approx(2 * 1 / (2 * 1 + 1 + 0))


def test_metric_input_errors():
    with pytest.raises(ValueError, match="zero examples"):
        glue.accuracy([], [])
    with pytest.raises(ValueError, match="equal length"):
        glue.accuracy([1, 0], [1])


def test_task_scores_and_macro_average_as_the_paper():
    mnli = glue.glue_task("mnli")
    assert mnli.metric_keys() == ("acc_m", "acc_mm")
    assert glue.task_score(mnli, {"acc_m": 84.0, "acc_mm": 83.0}) == pytest.approx(83.5)
    mrpc = glue.glue_task("MRPC")
    assert mrpc.metric_keys() == ("f1", "acc") and mrpc.metric_title() == "F1/Acc"
    assert glue.task_score(mrpc, {"f1": 92.0, "acc": 89.0}) == pytest.approx(90.5)
    sts = glue.glue_task("sts-b")
    assert glue.task_score(sts, {"pearson": 89.4, "spearman": 89.2}) == pytest.approx(89.3)
    assert glue.task_score(glue.glue_task("CoLA"), {"mcc": 61.3}) == pytest.approx(61.3)
    # The paper's Table 3, 24hBERT-15% row: per-task scores averaged give its Avg. 84.3.
    scores = {"CoLA": 61.3, "SST-2": 93.0, "MRPC": (92.0 + 89.0) / 2, "STS-B": (89.4 + 89.2) / 2,
              "QQP": (88.0 + 91.1) / 2, "MNLI": (84.0 + 83.6) / 2, "QNLI": 90.4, "RTE": 76.9}
    assert round(glue.macro_average(scores), 1) == 84.3


# ------------------------------------------------------------------------------------------ GLUE layouts


def _write(path: Path, lines: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _glue_tree(root: Path) -> Path:
    """Two-example train/dev files of every task in the official layout (with GLUE's unbalanced quotes)."""
    cola = ['gj04\t1\t\tOur friends won\'t buy "this analysis.', "gj04\t0\t*\tThey drank the pub."]
    sst = ["sentence\tlabel", 'a "gripping film \t1', "dull and slow \t0"]
    mrpc = ["Quality\t#1 ID\t#2 ID\t#1 String\t#2 String", "1\t1\t2\tHe said hi.\tHe greeted.",
            "0\t3\t4\tShe left.\tRain fell."]
    sts = ["index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore",
           "0\tmain-captions\tMSRvid\t2012test\t0001\tnone\tnone\tA plane takes off.\tA plane is taking off.\t5.000",
           "1\tmain-captions\tMSRvid\t2012test\t0004\tnone\tnone\tA man plays.\tA cat sleeps.\t0.500"]
    qqp = ["id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate", "0\t1\t2\tHow do I cook?\tHow to cook?\t1",
           "1\t3\t4\tWhy is the sky blue?\tWhat is rain?\t0", "2\t5\tbroken row"]
    mnli_header = ("index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\t"
                   "sentence1_parse\tsentence2_parse\tsentence1\tsentence2\tlabel1\tgold_label")
    mnli = [mnli_header, "0\t1\t1e\tgov\t( a )\t( b )\t(a)\t(b)\tThe cat sat.\tA cat sat.\tentailment\tentailment",
            "1\t2\t2c\tgov\t( a )\t( b )\t(a)\t(b)\tIt rains.\tIt is dry.\tcontradiction\tcontradiction",
            "2\t3\t3n\tgov\t( a )\t( b )\t(a)\t(b)\tHe ran.\tHe ran fast.\tneutral\tneutral"]
    qnli = ["index\tquestion\tsentence\tlabel", "0\tWho won?\tThe red team won.\tentailment",
            "1\tWhen?\tIt is blue.\tnot_entailment"]
    rte = ["index\tsentence1\tsentence2\tlabel", "0\tA dog barks.\tAn animal makes noise.\tentailment",
           "1\tA dog barks.\tA cat meows.\tnot_entailment"]
    for directory, lines in (("CoLA", cola), ("SST-2", sst), ("MRPC", mrpc), ("STS-B", sts), ("QQP", qqp),
                             ("QNLI", qnli), ("RTE", rte)):
        _write(root / directory / "train.tsv", lines)
        _write(root / directory / "dev.tsv", lines)
    for name in ("train.tsv", "dev_matched.tsv", "dev_mismatched.tsv"):
        _write(root / "MNLI" / name, mnli)
    return root


def test_every_glue_layout_reads(tmp_path):
    root = _glue_tree(tmp_path / "glue")
    cola = glue.load_task(glue.glue_task("CoLA"), root)
    assert cola.train.texts == [('Our friends won\'t buy "this analysis.',), ("They drank the pub.",)]
    assert cola.train.labels == [1, 0]
    sst = glue.load_task(glue.glue_task("SST-2"), root)
    assert sst.train.texts[0] == ('a "gripping film ',) and sst.train.labels == [1, 0]
    mrpc = glue.load_task(glue.glue_task("MRPC"), root)
    assert mrpc.train.texts[0] == ("He said hi.", "He greeted.") and mrpc.dev[""].labels == [1, 0]
    sts = glue.load_task(glue.glue_task("STS-B"), root)
    assert sts.spec.regression and sts.num_labels == 1
    assert sts.train.labels == [5.0, 0.5] and sts.train.texts[1] == ("A man plays.", "A cat sleeps.")
    qqp = glue.load_task(glue.glue_task("QQP"), root)  # the malformed third row is skipped
    assert len(qqp.train) == 2 and qqp.train.labels == [1, 0]
    mnli = glue.load_task(glue.glue_task("MNLI"), root)
    assert set(mnli.dev) == {"m", "mm"} and mnli.label_names == ("contradiction", "entailment", "neutral")
    assert mnli.train.labels == [1, 0, 2] and mnli.train.texts[2] == ("He ran.", "He ran fast.")
    qnli = glue.load_task(glue.glue_task("QNLI"), root)
    assert qnli.train.labels == [0, 1] and qnli.train.texts[0] == ("Who won?", "The red team won.")
    rte = glue.load_task(glue.glue_task("rte"), root)
    assert rte.train.labels == [0, 1]
    # --data-dir may also point straight at a task directory.
    assert glue.load_task(glue.glue_task("RTE"), root / "RTE").train.labels == [0, 1]


def test_missing_glue_file_names_expected_path(tmp_path):
    root = _glue_tree(tmp_path / "glue")
    (root / "MNLI" / "dev_mismatched.tsv").unlink()
    with pytest.raises(GlueDataError, match=r"expected file not found: .*MNLI/dev_mismatched\.tsv"):
        glue.load_task(glue.glue_task("MNLI"), root)
    with pytest.raises(GlueDataError, match=r"expected file not found: .*nowhere/CoLA/train\.tsv"):
        glue.load_task(glue.glue_task("CoLA"), tmp_path / "nowhere")


def test_unknown_glue_label_and_task(tmp_path):
    root = _glue_tree(tmp_path / "glue")
    _write(root / "RTE" / "dev.tsv", ["index\tsentence1\tsentence2\tlabel", "0\ta\tb\tmaybe"])
    with pytest.raises(GlueDataError, match=r"dev\.tsv:2: unknown label 'maybe'"):
        glue.load_task(glue.glue_task("RTE"), root)
    with pytest.raises(GlueDataError, match="unknown GLUE task 'WNLI'"):
        glue.glue_task("WNLI")


def test_malformed_row_is_an_error_outside_qqp(tmp_path):
    root = _glue_tree(tmp_path / "glue")
    _write(root / "SST-2" / "train.tsv", ["sentence\tlabel", "fine\t1", "no label here"])
    with pytest.raises(GlueDataError, match=r"train\.tsv:3: 1 fields, the header has 2"):
        glue.load_task(glue.glue_task("SST-2"), root)


def test_bad_regression_label(tmp_path):
    root = _glue_tree(tmp_path / "glue")
    lines = (root / "STS-B" / "train.tsv").read_text().splitlines()
    lines[1] = lines[1].rsplit("\t", 1)[0] + "\thigh"
    _write(root / "STS-B" / "train.tsv", lines)
    with pytest.raises(GlueDataError, match="label 'high' is not a number"):
        glue.load_task(glue.glue_task("STS-B"), root)


# --------------------------------------------------------------------------------------- custom files


def test_custom_csv_tsv_jsonl(tmp_path):
    _write(tmp_path / "train.csv", ["text,y", '"hello, world",pos', "bye,neg", "ok,pos"])
    _write(tmp_path / "dev.csv", ["text,y", "hi,neg"])
    task = glue.load_task(glue.custom_task("toy", str(tmp_path / "train.csv"), str(tmp_path / "dev.csv"),
                                           ["text"], "y"))
    assert task.label_names == ("neg", "pos") and task.train.labels == [1, 0, 1]
    assert task.train.texts[0] == ("hello, world",)

    records = [{"a": "x", "b": "y", "score": 1.5}, {"a": "u", "b": "v", "score": 0.0}]
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(record) for record in records) + "\n")
    (tmp_path / "dev.jsonl").write_text(json.dumps(records[0]) + "\n")
    regression = glue.load_task(glue.custom_task("toyreg", str(tmp_path / "train.jsonl"),
                                                 str(tmp_path / "dev.jsonl"), ["a", "b"], "score", regression=True))
    assert regression.train.labels == [1.5, 0.0] and regression.train.texts[0] == ("x", "y")
    assert regression.spec.metrics == ("pearson", "spearman")

    # Integer labels order numerically (2 < 10), not as text.
    _write(tmp_path / "train.tsv", ["s\tlabel", "a\t10", "b\t2"])
    _write(tmp_path / "dev.tsv", ["s\tlabel", "c\t2"])
    numeric = glue.load_task(glue.custom_task("num", str(tmp_path / "train.tsv"), str(tmp_path / "dev.tsv"),
                                              ["s"], "label"))
    assert numeric.label_names == ("2", "10") and numeric.dev[""].labels == [0]


def test_custom_bad_inputs(tmp_path):
    _write(tmp_path / "train.csv", ["text,y", "a,pos", "b,neg"])
    _write(tmp_path / "dev.csv", ["text,y", "c,neutral"])
    with pytest.raises(GlueDataError, match=r"dev\.csv:2: unknown label 'neutral', not among the training file"):
        glue.load_task(glue.custom_task("t", str(tmp_path / "train.csv"), str(tmp_path / "dev.csv"), ["text"], "y"))
    with pytest.raises(GlueDataError, match=r"missing column\(s\) 'sentence' \(found: text, y\)"):
        glue.load_task(glue.custom_task("t", str(tmp_path / "train.csv"), str(tmp_path / "dev.csv"),
                                        ["sentence"], "y"))
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(GlueDataError, match="empty file"):
        glue.load_task(glue.custom_task("t", str(tmp_path / "empty.csv"), str(tmp_path / "dev.csv"), ["text"], "y"))
    _write(tmp_path / "header_only.csv", ["text,y"])
    with pytest.raises(GlueDataError, match="header_only.csv: no examples"):
        glue.load_task(glue.custom_task("t", str(tmp_path / "header_only.csv"), str(tmp_path / "dev.csv"),
                                        ["text"], "y"))
    (tmp_path / "train.jsonl").write_text('{"text": "a"}\n')
    (tmp_path / "dev.jsonl").write_text('{"text": "a", "y": 1}\n')
    with pytest.raises(GlueDataError, match=r"train\.jsonl:1: missing field 'y'"):
        glue.load_task(glue.custom_task("t", str(tmp_path / "train.jsonl"), str(tmp_path / "dev.jsonl"),
                                        ["text"], "y"))
    with pytest.raises(GlueDataError, match="unknown file type '.txt'"):
        glue.custom_task("t", "a.txt", "b.txt", ["text"], "y")
    with pytest.raises(GlueDataError, match="does not apply to a classification task"):
        glue.custom_task("t", "a.csv", "b.csv", ["text"], "y", metrics=["pearson"])


def test_non_utf8_file_is_one_line_naming_the_line(tmp_path):
    """A binary or Latin-1 file used to end in a UnicodeDecodeError traceback."""
    _write(tmp_path / "dev.csv", ["text,y", "c,pos"])
    (tmp_path / "train.csv").write_bytes(b"text,y\nfine,pos\ncaf\xe9,neg\n")
    with pytest.raises(GlueDataError, match=r"train\.csv:3: not UTF-8 text$"):
        glue.load_task(glue.custom_task("t", str(tmp_path / "train.csv"), str(tmp_path / "dev.csv"), ["text"], "y"))
    (tmp_path / "train.jsonl").write_bytes(b'{"text": "a", "y": 1}\n{"text": "\xff", "y": 0}\n')
    (tmp_path / "dev.jsonl").write_text('{"text": "a", "y": 1}\n')
    with pytest.raises(GlueDataError, match=r"train\.jsonl:2: not UTF-8 text$"):
        glue.load_task(glue.custom_task("t", str(tmp_path / "train.jsonl"), str(tmp_path / "dev.jsonl"),
                                        ["text"], "y"))
