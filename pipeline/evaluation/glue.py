"""GLUE task definitions, readers for the official GLUE TSV layout and for generic CSV/TSV/JSONL files, and the
GLUE metrics.

Layouts (the files of the official GLUE download, one sub-directory per task under ``--data-dir``)::

    CoLA/   train.tsv dev.tsv            no header; columns: source, label, original label, sentence
    SST-2/  train.tsv dev.tsv            header: sentence, label
    MRPC/   train.tsv dev.tsv            header: Quality, #1 ID, #2 ID, #1 String, #2 String
    STS-B/  train.tsv dev.tsv            header: index ... sentence1, sentence2, score (float 0..5)
    QQP/    train.tsv dev.tsv            header: id, qid1, qid2, question1, question2, is_duplicate
    MNLI/   train.tsv dev_matched.tsv dev_mismatched.tsv
                                         header: index ... sentence1, sentence2, ..., gold_label
    QNLI/   train.tsv dev.tsv            header: index, question, sentence, label
    RTE/    train.tsv dev.tsv            header: index, sentence1, sentence2, label

GLUE TSVs are read with quoting disabled: their sentences contain unbalanced double quotes, which a quote-aware
reader would merge across lines. QQP's files hold a few rows with missing fields; those (and only for QQP) are
skipped and counted, as the reference GLUE loaders do. Generic ``.csv``/``.tsv`` files are read with ordinary CSV
quoting (what pandas and spreadsheets write) and must have a header row; ``.jsonl`` files hold one JSON object per
line.

Metrics return fractions in [0, 1] (correlations in [-1, 1]); Matthews correlation and F1 are scikit-learn's,
Pearson and Spearman scipy's. Degenerate cases follow one rule: a statistic whose
denominator is zero is reported as 0.0, never nan, so that run selection and averages stay well defined:
Matthews correlation with constant predictions or constant labels (scikit-learn's convention), F1 with no
positive predictions and no positive labels, Pearson/Spearman when either side is constant or has fewer than two
values. A constant predictor has no correlation skill, so 0.0 is also the meaningful value.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from pipeline.errors import DataError

logger = logging.getLogger(__name__)


class GlueDataError(DataError, ValueError):
    """A bad task input (missing file, missing column, unknown label, empty file); the message is one line.

    A ``DataError`` like the rest of the data path, so callers that handle those handle this too."""


# --------------------------------------------------------------------------------------------------- metrics


def _as_arrays(predictions: Sequence, labels: Sequence) -> tuple[np.ndarray, np.ndarray]:
    predictions_array = np.asarray(predictions)
    labels_array = np.asarray(labels)
    if predictions_array.shape != labels_array.shape or predictions_array.ndim != 1:
        raise ValueError(
            f"predictions and labels must be 1-D of equal length, got {predictions_array.shape} "
            f"and {labels_array.shape}"
        )
    if predictions_array.size == 0:
        raise ValueError("cannot compute a metric over zero examples")
    return predictions_array, labels_array


def accuracy(predictions: Sequence[int], labels: Sequence[int]) -> float:
    """Fraction of exact matches."""
    predictions_array, labels_array = _as_arrays(predictions, labels)
    return float(np.mean(predictions_array == labels_array))


def f1_binary(predictions: Sequence[int], labels: Sequence[int], positive_label: int = 1) -> float:
    """F1 of the positive class (GLUE's MRPC/QQP F1); 0.0 when there are no positives on either side."""
    import sklearn.metrics  # here, not at the top: importing it takes seconds, most commands never score

    predictions_array, labels_array = _as_arrays(predictions, labels)
    # Positive class against the rest, so any other label value counts as negative (as GLUE's F1 does).
    return float(sklearn.metrics.f1_score(labels_array == positive_label, predictions_array == positive_label,
                                          zero_division=0.0))


def matthews_corrcoef(predictions: Sequence[int], labels: Sequence[int]) -> float:
    """Matthews correlation (multi-class form, Gorodkin 2004; equals the binary formula for two classes).

    0.0 when the denominator is zero (constant predictions or constant labels): scikit-learn's own rule."""
    import sklearn.metrics

    predictions_array, labels_array = _as_arrays(predictions, labels)
    if np.unique(np.concatenate([labels_array, predictions_array])).size < 2:
        return 0.0  # one class in all: the zero denominator, without scikit-learn's single-label warning
    return float(sklearn.metrics.matthews_corrcoef(labels_array, predictions_array))


def _correlation(statistic, predictions: Sequence[float], labels: Sequence[float]) -> float:
    """``statistic`` (scipy's pearsonr or spearmanr) of the two sides, 0.0 in the degenerate cases where scipy
    gives nan with a warning (a constant side) or raises (fewer than two values); a nan input (a diverged
    regression run) still gives nan, which run selection ranks last."""
    predictions_array, labels_array = _as_arrays(predictions, labels)
    predictions_array = predictions_array.astype(np.float64)
    labels_array = labels_array.astype(np.float64)
    if predictions_array.size < 2:
        return 0.0
    if not (np.isfinite(predictions_array).all() and np.isfinite(labels_array).all()):
        return math.nan
    if np.all(predictions_array == predictions_array[0]) or np.all(labels_array == labels_array[0]):
        return 0.0
    return float(statistic(predictions_array, labels_array).statistic)


def pearson(predictions: Sequence[float], labels: Sequence[float]) -> float:
    """Pearson correlation (scipy); 0.0 when either side is constant or there are fewer than two values."""
    import scipy.stats

    return _correlation(scipy.stats.pearsonr, predictions, labels)


def spearman(predictions: Sequence[float], labels: Sequence[float]) -> float:
    """Spearman rank correlation (scipy, ties averaged); 0.0 when either side is constant or has < 2 values."""
    import scipy.stats

    return _correlation(scipy.stats.spearmanr, predictions, labels)


# Metric name -> function(predictions, labels). The names are the keys of every metrics dict.
METRIC_FUNCTIONS: dict[str, Callable[[Sequence, Sequence], float]] = {
    "mcc": matthews_corrcoef,
    "acc": accuracy,
    "f1": f1_binary,
    "pearson": pearson,
    "spearman": spearman,
}
REGRESSION_METRICS = ("pearson", "spearman")
METRIC_TITLES = {"mcc": "Mcc", "acc": "Acc", "f1": "F1", "pearson": "Pear", "spearman": "Spea"}


# ------------------------------------------------------------------------------------------------ task specs


@dataclass(frozen=True)
class DevSplit:
    """One evaluation file of a task."""

    suffix: str  # "" for single-dev tasks; "m"/"mm" for MNLI, appended to metric names as "acc_m"
    path: str  # file name relative to the task directory (GLUE) or a full path (custom tasks)


@dataclass(frozen=True)
class TaskSpec:
    """Everything needed to read a task's files and score its predictions."""

    name: str  # canonical name, e.g. "MNLI"; also the results key and table column
    directory: str | None  # sub-directory under --data-dir (GLUE); None: paths are used as given
    train_path: str  # train file, relative to the task directory or a full path
    dev_splits: tuple[DevSplit, ...]
    text_columns: tuple[str | int, ...]  # one (single sentence) or two (pair) columns; int = headerless index
    label_column: str | int
    has_header: bool
    file_format: str  # "glue-tsv" (no quoting), "csv", "tsv", "jsonl"
    regression: bool = False
    # Fixed label vocabulary (GLUE); None: taken from the training file (custom classification tasks).
    label_names: tuple[str, ...] | None = None
    metrics: tuple[str, ...] = ("acc",)  # metric names per dev split, in table order
    skip_malformed_rows: bool = False  # QQP only: a few official rows lack fields

    def metric_keys(self) -> tuple[str, ...]:
        """Flat metric keys in table order: for MNLI ("acc_m", "acc_mm"), else the metric names."""
        return tuple(
            f"{metric}_{split.suffix}" if split.suffix else metric
            for split in self.dev_splits
            for metric in self.metrics
        )

    def column_title(self) -> str:
        """Table header, e.g. "MNLI-m/mm" for MNLI, else the task name."""
        suffixes = [split.suffix for split in self.dev_splits if split.suffix]
        return f"{self.name}-{'/'.join(suffixes)}" if suffixes else self.name

    def metric_title(self) -> str:
        """Second header row, e.g. "F1/Acc" or "Pear/Spea"."""
        return "/".join(METRIC_TITLES[metric] for metric in self.metrics)

    def resolve(self, data_dir: str | os.PathLike | None, relative_path: str) -> Path:
        """Absolute location of one of the task's files."""
        if self.directory is None:
            return Path(relative_path)
        if data_dir is None:
            raise GlueDataError(f"task {self.name} reads the GLUE files: pass --data-dir")
        base = Path(data_dir)
        # Accept --data-dir pointing at the task directory itself when it holds the files directly.
        task_dir = base / self.directory
        if not task_dir.is_dir() and (base / self.train_path).exists():
            task_dir = base
        return task_dir / relative_path


_SINGLE = (DevSplit("", "dev.tsv"),)

GLUE_TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        TaskSpec("CoLA", "CoLA", "train.tsv", _SINGLE, (3,), 1, False, "glue-tsv", False, ("0", "1"), ("mcc",)),
        TaskSpec("SST-2", "SST-2", "train.tsv", _SINGLE, ("sentence",), "label", True, "glue-tsv", False,
                 ("0", "1"), ("acc",)),
        TaskSpec("MRPC", "MRPC", "train.tsv", _SINGLE, ("#1 String", "#2 String"), "Quality", True, "glue-tsv",
                 False, ("0", "1"), ("f1", "acc")),
        TaskSpec("STS-B", "STS-B", "train.tsv", _SINGLE, ("sentence1", "sentence2"), "score", True, "glue-tsv",
                 True, None, ("pearson", "spearman")),
        TaskSpec("QQP", "QQP", "train.tsv", _SINGLE, ("question1", "question2"), "is_duplicate", True,
                 "glue-tsv", False, ("0", "1"), ("f1", "acc"), skip_malformed_rows=True),
        TaskSpec("MNLI", "MNLI", "train.tsv", (DevSplit("m", "dev_matched.tsv"), DevSplit("mm", "dev_mismatched.tsv")),
                 ("sentence1", "sentence2"), "gold_label", True, "glue-tsv", False,
                 ("contradiction", "entailment", "neutral"), ("acc",)),
        TaskSpec("QNLI", "QNLI", "train.tsv", _SINGLE, ("question", "sentence"), "label", True, "glue-tsv", False,
                 ("entailment", "not_entailment"), ("acc",)),
        TaskSpec("RTE", "RTE", "train.tsv", _SINGLE, ("sentence1", "sentence2"), "label", True, "glue-tsv", False,
                 ("entailment", "not_entailment"), ("acc",)),
    )
}
# The order of the paper's Table 3 columns.
GLUE_TASK_ORDER = ("CoLA", "SST-2", "MRPC", "STS-B", "QQP", "MNLI", "QNLI", "RTE")
_TASK_ALIASES = {name.lower().replace("-", ""): name for name in GLUE_TASKS} | {"sst": "SST-2", "sts": "STS-B"}


def glue_task(name: str) -> TaskSpec:
    """Look a GLUE task up by name, case- and dash-insensitively ("sst2", "STS-B", "mnli")."""
    key = name.strip().lower().replace("-", "").replace("_", "")
    if key not in _TASK_ALIASES:
        raise GlueDataError(f"unknown GLUE task {name!r} (known: {', '.join(GLUE_TASK_ORDER)})")
    return GLUE_TASKS[_TASK_ALIASES[key]]


def custom_task(
    name: str,
    train_file: str,
    dev_file: str,
    text_fields: Sequence[str],
    label_field: str,
    regression: bool = False,
    metrics: Sequence[str] | None = None,
) -> TaskSpec:
    """A task over any CSV/TSV/JSONL pair of files with named columns (format from the file extension)."""
    if not 1 <= len(text_fields) <= 2:
        raise GlueDataError(f"--text-fields takes one or two column names, got {list(text_fields)}")
    formats = {_file_format(train_file), _file_format(dev_file)}
    if len(formats) != 1:
        raise GlueDataError(f"train and dev files must have the same format: {train_file}, {dev_file}")
    if metrics is None:
        metrics = REGRESSION_METRICS if regression else ("acc",)
    for metric in metrics:
        if metric not in METRIC_FUNCTIONS:
            raise GlueDataError(f"unknown metric {metric!r} (known: {', '.join(METRIC_FUNCTIONS)})")
        if regression != (metric in REGRESSION_METRICS):
            kind = "regression" if regression else "classification"
            raise GlueDataError(f"metric {metric!r} does not apply to a {kind} task")
    return TaskSpec(
        name=name,
        directory=None,
        train_path=str(train_file),
        dev_splits=(DevSplit("", str(dev_file)),),
        text_columns=tuple(text_fields),
        label_column=label_field,
        has_header=True,
        file_format=formats.pop(),
        regression=regression,
        label_names=None,
        metrics=tuple(metrics),
    )


def _file_format(path: str) -> str:
    suffix = Path(path).suffix.lower()
    formats = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".json": "jsonl"}
    if suffix not in formats:
        raise GlueDataError(f"{path}: unknown file type {suffix!r} (expected .csv, .tsv or .jsonl)")
    return formats[suffix]


# -------------------------------------------------------------------------------------------------- reading
# Hand-written rather than `datasets.load_dataset("glue", ...)`: they read the official files offline (no hub
# download or cache), and every error names the file and line.


@dataclass
class Examples:
    """Texts and labels of one split; labels are class indices (classification) or floats (regression)."""

    texts: list[tuple[str, ...]] = field(default_factory=list)
    labels: list = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class TaskData:
    """A task's training and dev examples, with the label vocabulary that maps class index -> label text."""

    spec: TaskSpec
    train: Examples
    dev: dict[str, Examples]  # keyed by DevSplit.suffix
    label_names: tuple[str, ...]  # empty for regression

    @property
    def num_labels(self) -> int:
        return 1 if self.spec.regression else len(self.label_names)


def _read_rows(path: Path, spec: TaskSpec) -> tuple[list[dict | list], int]:
    """``(line number, row)`` pairs of a file (row: a dict keyed by the header when there is one, else the list
    of fields) and the number of skipped malformed rows."""
    if not path.is_file():
        raise GlueDataError(f"{spec.name}: expected file not found: {path}")
    rows: list = []
    skipped = 0
    if spec.file_format == "jsonl":
        with open(path, encoding="utf-8") as handle:
            for line_number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise GlueDataError(f"{path}:{line_number}: invalid JSON ({exc.msg})") from None
                if not isinstance(record, dict):
                    raise GlueDataError(f"{path}:{line_number}: expected a JSON object per line")
                rows.append((line_number, record))
        return rows, skipped

    csv.field_size_limit(sys.maxsize)
    delimiter = "," if spec.file_format == "csv" else "\t"
    quoting = csv.QUOTE_NONE if spec.file_format == "glue-tsv" else csv.QUOTE_MINIMAL
    with open(path, encoding="utf-8-sig", newline="") as handle:
        reader = csv.reader(handle, delimiter=delimiter, quoting=quoting)
        header: list[str] | None = None
        for fields in reader:
            if not fields or (len(fields) == 1 and not fields[0].strip()):
                continue
            if spec.has_header and header is None:
                header = [name.strip() for name in fields]
                continue
            line_number = reader.line_num
            if header is not None:
                if len(fields) != len(header):
                    if spec.skip_malformed_rows:
                        skipped += 1
                        continue
                    raise GlueDataError(
                        f"{path}:{line_number}: {len(fields)} fields, the header has {len(header)}"
                    )
                rows.append((line_number, dict(zip(header, fields))))
            else:
                rows.append((line_number, fields))
        if spec.has_header and header is None:
            raise GlueDataError(f"{path}: empty file (no header and no examples)")
        if header is not None:
            wanted = list(spec.text_columns) + [spec.label_column]
            missing = [column for column in wanted if column not in header]
            if missing:
                raise GlueDataError(
                    f"{path}: missing column(s) {', '.join(map(repr, missing))} (found: {', '.join(header)})"
                )
    return rows, skipped


def _field(path: Path, line_number: int, row: dict | list, column: str | int):
    if isinstance(row, dict):
        if column not in row:
            raise GlueDataError(f"{path}:{line_number}: missing field {column!r}")
        return row[column]
    if not isinstance(column, int) or column >= len(row):
        raise GlueDataError(f"{path}:{line_number}: {len(row)} fields, expected at least {int(column) + 1}")
    return row[column]


def _label_text(value) -> str:
    # JSON integers and booleans become "1"/"true"; numbers such as 1.0 stay "1.0" (labels are compared as text).
    if isinstance(value, bool):
        return str(value).lower()
    return str(value).strip()


def _first_non_utf8_line(path: Path) -> int:
    with open(path, "rb") as handle:
        for line_number, line in enumerate(handle, start=1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError:
                return line_number
    return 0


def read_split(path: Path, spec: TaskSpec) -> tuple[list[tuple[str, ...]], list[str], list[int]]:
    """Texts, raw label strings and line numbers of one file; raises GlueDataError on bad input."""
    try:
        rows, skipped = _read_rows(path, spec)
    except UnicodeDecodeError:
        raise GlueDataError(f"{path}:{_first_non_utf8_line(path)}: not UTF-8 text") from None
    if skipped:
        logger.warning("%s: skipped %d malformed row(s) in %s", spec.name, skipped, path)
    if not rows:
        raise GlueDataError(f"{path}: no examples")
    texts, labels, lines = [], [], []
    for line_number, row in rows:
        text = tuple(
            "" if (value := _field(path, line_number, row, column)) is None else str(value)
            for column in spec.text_columns
        )
        texts.append(text)
        labels.append(_label_text(_field(path, line_number, row, spec.label_column)))
        lines.append(line_number)
    return texts, labels, lines


def _encode_labels(
    path: Path, spec: TaskSpec, raw_labels: list[str], lines: list[int], label_index: dict[str, int] | None
) -> list:
    if spec.regression:
        values = []
        for raw, line_number in zip(raw_labels, lines):
            try:
                value = float(raw)
            except ValueError:
                raise GlueDataError(f"{path}:{line_number}: label {raw!r} is not a number (regression task)") from None
            if not math.isfinite(value):
                raise GlueDataError(f"{path}:{line_number}: label {raw!r} is not finite")
            values.append(value)
        return values
    assert label_index is not None
    encoded = []
    for raw, line_number in zip(raw_labels, lines):
        if raw not in label_index:
            known = ", ".join(repr(name) for name in label_index)
            origin = "the task's labels" if spec.label_names is not None else "the training file"
            raise GlueDataError(f"{path}:{line_number}: unknown label {raw!r}, not among {origin} ({known})")
        encoded.append(label_index[raw])
    return encoded


def _sorted_labels(raw_labels: set[str]) -> tuple[str, ...]:
    """Label vocabulary of a custom task: numeric order when all labels are integers, else text order."""
    try:
        return tuple(sorted(raw_labels, key=lambda text: (int(text), text)))
    except ValueError:
        return tuple(sorted(raw_labels))


def load_task(spec: TaskSpec, data_dir: str | os.PathLike | None = None) -> TaskData:
    """Read a task's train and dev files (GLUE layout or custom) and encode labels."""
    train_path = spec.resolve(data_dir, spec.train_path)
    # Check every expected file up front, so a missing dev file is reported before any reading work.
    dev_paths = {split.suffix: spec.resolve(data_dir, split.path) for split in spec.dev_splits}
    for path in [train_path, *dev_paths.values()]:
        if not path.is_file():
            raise GlueDataError(f"{spec.name}: expected file not found: {path}")

    train_texts, train_raw, train_lines = read_split(train_path, spec)
    if spec.regression:
        label_names: tuple[str, ...] = ()
        label_index = None
    else:
        label_names = spec.label_names if spec.label_names is not None else _sorted_labels(set(train_raw))
        label_index = {name: index for index, name in enumerate(label_names)}
        if len(label_names) < 2 and spec.label_names is None:
            raise GlueDataError(f"{train_path}: only one label value ({label_names[0]!r}); need at least two")
    train = Examples(train_texts, _encode_labels(train_path, spec, train_raw, train_lines, label_index))
    dev = {}
    for suffix, path in dev_paths.items():
        texts, raw, lines = read_split(path, spec)
        dev[suffix] = Examples(texts, _encode_labels(path, spec, raw, lines, label_index))
    if "f1" in spec.metrics and len(label_names) != 2:
        raise GlueDataError(f"{spec.name}: F1 needs a binary task, found {len(label_names)} labels")
    return TaskData(spec=spec, train=train, dev=dev, label_names=label_names)


# ------------------------------------------------------------------------------------------------- scoring


def compute_metrics(spec: TaskSpec, split_suffix: str, predictions: Sequence, labels: Sequence) -> dict[str, float]:
    """The task's metrics on one dev split, keyed as in ``spec.metric_keys()`` (fractions, not percent)."""
    results = {}
    for metric in spec.metrics:
        key = f"{metric}_{split_suffix}" if split_suffix else metric
        results[key] = METRIC_FUNCTIONS[metric](predictions, labels)
    return results


def task_score(spec: TaskSpec, metrics: dict[str, float]) -> float:
    """The task's single number, as the GLUE leaderboard and the paper compute it: the mean of its metrics
    (MNLI: mean of -m and -mm accuracy; MRPC/QQP: mean of F1 and accuracy; STS-B: mean of Pearson and Spearman;
    the other tasks: their one metric)."""
    return float(np.mean([metrics[key] for key in spec.metric_keys()]))


def macro_average(scores: dict[str, float]) -> float:
    """Unweighted mean of the per-task scores (the paper's "Avg." column)."""
    if not scores:
        raise ValueError("no task scores to average")
    return float(np.mean(list(scores.values())))
