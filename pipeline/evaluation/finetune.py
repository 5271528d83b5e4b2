"""Downstream evaluation: fine-tune an exported encoder on GLUE-style tasks with the paper's protocol.

    python -m pipeline finetune --model EXPORT_DIR --data-dir glue_data --tasks all --grid paper --seeds 5 \\
        --output-dir results/glue
    python -m pipeline finetune --model EXPORT_DIR --train-file train.jsonl --dev-file dev.jsonl \\
        --text-fields sentence --label-field label --lr 1e-4 --batch-size 16 --epochs 3 --seeds 3 --output-dir out

Protocol (paper, §3.1 and Appendix B / Table 5): every task is fine-tuned over a hyper-parameter grid
(QQP/MNLI/QNLI: lr {5e-5, 8e-5}, batch 32, epochs {3, 5}; CoLA/SST-2/MRPC/STS-B/RTE: lr {1e-5, 3e-5, 5e-5, 8e-5},
batch {16, 32}, epochs {3, 5, 10}; weight decay 0.1, linear warm-up over 6% of the steps then linear decay),
five times with different seeds. Each run is evaluated on dev after every epoch and keeps its best epoch. The
reported number is a median over seeds; two selections are computed from the same runs and both are saved:

* ``seed-best`` (default, Appendix B's wording): for each seed, the best run over the whole grid; then the
  median over seeds.
* ``grid-median``: for each grid point, the median over seeds; then the best grid point.

A task's score is the mean of its metrics (GLUE's rule: MNLI -m/-mm, MRPC/QQP F1/Acc, STS-B Pearson/Spearman;
a custom task: the mean of its ``--metrics``); epochs, runs and grid points are ranked by it. The "median run"
of an even number of seeds is the mean of the two middle runs. Metrics shown for a task are
those of its median run(s), so the displayed metrics always average to the displayed task score. RTE, STS-B
and MRPC can start from an MNLI-fine-tuned model (``--init-from DIR``, or ``--init-from mnli`` to use the best
MNLI model of this invocation); a classifier head whose label count differs is re-initialised. Only the head
may be new: a model whose encoder tensors are missing or of another shape is refused (they would otherwise be
re-initialised at random without a word).

Outputs under ``--output-dir`` (written atomically, updated after every task): ``results.json`` (config, every
run's per-epoch metrics, both selections, the macro average) and ``results.md`` (a Table-3-style row). Scores
are in percent. Every finished run is also appended to ``<TASK>/runs.jsonl``; ``--resume`` continues an
interrupted search from that log. ``--save-best-model`` also saves the best run's best epoch per task to
``<TASK>/best_model``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch

from pipeline.errors import PipelineError, describe_os_error, exit_on_data_error, one_line
from pipeline.evaluation import glue
from pipeline.evaluation.glue import TaskData, TaskSpec
from pipeline.io import (default_file_mode, library_os_error, make_staging_dir, publish_directory,
                         write_text_atomic)
from pipeline.training.checkpoint import CHECKPOINTS_SUBDIR, LATEST_FILE, RUN_CONFIG_FILE
from pipeline.training.metrics import setup_logging
from pipeline.training.schedule import lr_multiplier

logger = logging.getLogger(__name__)


class FinetuneError(PipelineError, ValueError):
    """A bad fine-tuning setting (model directory, grid, precision); the message is one line."""


class FinetuneOutputError(PipelineError):
    """A fine-tuning output that could not be written (disk full, read-only, ...); one line naming the path."""


# ------------------------------------------------------------------------------------------------ settings


@dataclass(frozen=True)
class GridPoint:
    """One hyper-parameter setting of the search."""

    learning_rate: float
    batch_size: int
    epochs: int

    def label(self) -> str:
        return f"lr={self.learning_rate:g} bs={self.batch_size} ep={self.epochs}"


# Table 5: the large tasks get the small grid.
PAPER_GRID_LARGE_TASKS = {"learning_rates": (5e-5, 8e-5), "batch_sizes": (32,), "epoch_counts": (3, 5)}
PAPER_GRID_SMALL_TASKS = {
    "learning_rates": (1e-5, 3e-5, 5e-5, 8e-5),
    "batch_sizes": (16, 32),
    "epoch_counts": (3, 5, 10),
}
LARGE_TASKS = ("QQP", "MNLI", "QNLI")
# Table 5: "RTE, STS, and MRPC are fine-tuned from the MNLI model instead of the pre-trained model."
TASKS_FROM_MNLI = ("RTE", "STS-B", "MRPC")


@dataclass
class FinetuneConfig:
    """Settings of one ``pipeline.evaluation.finetune`` invocation."""

    model_path: str  # exported Hugging Face directory (config.json, model.safetensors, tokenizer files)
    output_dir: str  # results.json, results.md and optional best models go here
    # Explicit grid values; None takes the paper's Table 5 value for the task (see paper_grid()).
    learning_rates: tuple[float, ...] | None = None
    batch_sizes: tuple[int, ...] | None = None
    epoch_counts: tuple[int, ...] | None = None
    seeds: int = 5  # runs per grid point, seeds base_seed .. base_seed + seeds - 1
    base_seed: int = 1
    selection: str = "seed-best"  # "seed-best" or "grid-median", see the module docstring
    weight_decay: float = 0.1  # Table 5; not applied to biases and LayerNorm weights
    warmup_ratio: float = 0.06  # Table 5: linear warm-up over this fraction of the steps, then linear decay
    adam_betas: tuple[float, float] = (0.9, 0.98)  # RoBERTa's fine-tuning Adam settings
    adam_eps: float = 1e-6
    max_grad_norm: float = 1.0  # 0 disables clipping
    max_length: int = 128  # tokens per example including <s> and </s>; clamped to the model's positions
    eval_batch_size: int = 64
    precision: str = "fp32"  # "fp32", "fp16" (GPU only, loss scaling), "bf16" (autocast)
    device: str | None = None  # None: "cuda" when available, else "cpu"
    # Weights for RTE/STS-B/MRPC (and custom tasks): a directory, "mnli" (this run's best MNLI model), or None.
    init_from: str | None = None
    save_best_model: bool = False
    max_train_examples: int | None = None  # keep only the first N training examples (smoke tests)
    max_dev_examples: int | None = None
    progress: bool = True  # tqdm bars
    # Reuse the runs already logged in <output_dir>/<TASK>/runs.jsonl by an interrupted invocation with the same
    # settings; without it, a task's run log starts afresh.
    resume: bool = False
    run_name: str | None = None  # the table's row name; default: the model directory's name

    def grid_for(self, task_name: str) -> list[GridPoint]:
        """The task's grid: Table 5's values, with any explicitly given dimension replacing the paper's."""
        paper = PAPER_GRID_LARGE_TASKS if task_name in LARGE_TASKS else PAPER_GRID_SMALL_TASKS
        learning_rates = self.learning_rates or paper["learning_rates"]
        batch_sizes = self.batch_sizes or paper["batch_sizes"]
        epoch_counts = self.epoch_counts or paper["epoch_counts"]
        return [
            GridPoint(float(lr), int(batch), int(epochs))
            for lr in learning_rates
            for batch in batch_sizes
            for epochs in epoch_counts
        ]

    def seed_list(self) -> list[int]:
        return [self.base_seed + offset for offset in range(self.seeds)]

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if self.seeds < 1:
            raise FinetuneError("--seeds must be at least 1")
        if self.selection not in ("seed-best", "grid-median"):
            raise FinetuneError(f"unknown --selection {self.selection!r} (seed-best or grid-median)")
        if self.precision not in ("fp32", "fp16", "bf16"):
            raise FinetuneError(f"unknown --precision {self.precision!r} (fp32, fp16 or bf16)")
        for name, values in (("--lr", self.learning_rates), ("--batch-size", self.batch_sizes),
                             ("--epochs", self.epoch_counts)):
            if values is not None and (not values or any(value <= 0 for value in values)):
                raise FinetuneError(f"{name} values must be positive")
        if not 0 <= self.warmup_ratio < 1:
            raise FinetuneError("--warmup-ratio must be in [0, 1)")
        if self.max_length < 4:
            raise FinetuneError("--max-length must be at least 4")
        if not 0 <= self.base_seed <= 2**32 - self.seeds:  # numpy's seed range (transformers.set_seed)
            raise FinetuneError(f"--base-seed must be in [0, {2**32 - self.seeds}]")
        if self.eval_batch_size < 1:
            raise FinetuneError("--eval-batch-size must be at least 1")
        if self.weight_decay < 0 or self.max_grad_norm < 0:
            raise FinetuneError("--weight-decay and --max-grad-norm must be >= 0 (--max-grad-norm 0: no clipping)")
        for name, count in (("--max-train-examples", self.max_train_examples),
                            ("--max-dev-examples", self.max_dev_examples)):
            if count is not None and count < 1:
                raise FinetuneError(f"{name} must be at least 1")


# ------------------------------------------------------------------------------------------- aggregation


@dataclass
class RunOutcome:
    """One fine-tuning run's result: its best dev epoch (1-based) and that epoch's score and metrics."""

    grid_point: GridPoint
    seed: int
    best_epoch: int
    score: float  # the task score at the best epoch (percent)
    metrics: dict[str, float]  # the task's metrics at the best epoch (percent)
    epoch_metrics: list[dict[str, float]] = field(default_factory=list)  # every epoch's metrics (percent)
    seconds: float = 0.0


@dataclass
class Selection:
    """A task's reported number: the median over seeds of per-run best scores."""

    score: float
    metrics: dict[str, float]
    grid_point: GridPoint | None  # grid-median: the chosen grid point; seed-best: None (one per seed)
    median_over: list[tuple[int, GridPoint, float]]  # (seed, grid point, score) of the runs the median is over


def rank_key(score: float) -> float:
    """Ordering key for scores: nan (a diverged regression run) ranks below every finite score."""
    return -math.inf if math.isnan(score) else score


def median_of_runs(runs: Sequence[RunOutcome]) -> tuple[float, dict[str, float]]:
    """Median score over runs, with the metrics of the median run (mean of the two middle ones if even)."""
    if not runs:
        raise ValueError("no runs to take a median of")
    ordered = sorted(runs, key=lambda run: rank_key(run.score))
    middle = len(ordered) // 2
    middle_runs = ordered[middle : middle + 1] if len(ordered) % 2 else ordered[middle - 1 : middle + 1]
    score = float(np.mean([run.score for run in middle_runs]))
    metrics = {key: float(np.mean([run.metrics[key] for run in middle_runs])) for key in middle_runs[0].metrics}
    return score, metrics


def select(runs: Sequence[RunOutcome], selection: str) -> Selection:
    """Aggregate a task's runs by ``selection`` ("seed-best" or "grid-median", see the module docstring).

    Ties between grid points are broken by grid order (the first listed wins), so results are deterministic."""
    if not runs:
        raise ValueError("no runs to select from")
    if selection == "seed-best":
        best_by_seed: dict[int, RunOutcome] = {}
        for run in runs:
            if run.seed not in best_by_seed or rank_key(run.score) > rank_key(best_by_seed[run.seed].score):
                best_by_seed[run.seed] = run
        chosen = list(best_by_seed.values())
        score, metrics = median_of_runs(chosen)
        return Selection(score, metrics, None, [(run.seed, run.grid_point, run.score) for run in chosen])
    if selection == "grid-median":
        by_point: dict[GridPoint, list[RunOutcome]] = {}
        for run in runs:
            by_point.setdefault(run.grid_point, []).append(run)
        best: tuple[float, dict[str, float], GridPoint] | None = None
        for point, point_runs in by_point.items():
            score, metrics = median_of_runs(point_runs)
            if best is None or rank_key(score) > rank_key(best[0]):
                best = (score, metrics, point)
        assert best is not None
        chosen_runs = by_point[best[2]]
        return Selection(best[0], best[1], best[2], [(run.seed, run.grid_point, run.score) for run in chosen_runs])
    raise ValueError(f"unknown selection {selection!r}")


# ------------------------------------------------------------------------------------------------ model I/O


def _quiet_transformers() -> None:
    # transformers' load report lists the new classification head on every load; load_classifier checks the
    # loading info itself and refuses anything beyond the head, so the report is noise here.
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()


def check_model_dir(path: str, what: str = "--model") -> Path:
    """``path`` if it holds a Hugging Face model; a pre-training run or checkpoint gets the export command."""
    directory = Path(path)
    is_run = (directory / CHECKPOINTS_SUBDIR).is_dir()
    is_checkpoint = (directory / LATEST_FILE).is_file() or (directory / RUN_CONFIG_FILE).is_file()
    if is_run or is_checkpoint:
        raise FinetuneError(
            f"{what} {directory}: this is a pre-training {'run' if is_run else 'checkpoint'}: export it first with "
            f"python -m pipeline export {directory} --output HF_DIR, then pass --model HF_DIR"
        )
    if not (directory / "config.json").is_file():
        raise FinetuneError(f"{what}: no Hugging Face model at {directory} (expected {directory / 'config.json'})")
    return directory


def load_tokenizer(model_dir: str):
    """The exported tokenizer. Its own post-processor builds the inputs, so it must produce RoBERTa's format
    (``<s> A </s>`` and ``<s> A </s></s> B </s>``, what ``pipeline.data.tokenizer`` attaches); checked here on a
    probe pair, since a tokenizer without that template would silently feed the encoder inputs without them."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError) as exc:
        raise FinetuneError(f"cannot load the tokenizer from {model_dir}: {one_line(exc)}") from None
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if getattr(tokenizer, name, None) is None:
            raise FinetuneError(f"the tokenizer in {model_dir} has no {name.replace('_id', '')} token")
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    first, second = (tokenizer(text, add_special_tokens=False)["input_ids"] for text in ("first", "second"))
    if (tokenizer("first")["input_ids"] != [bos, *first, eos]
            or tokenizer("first", "second")["input_ids"] != [bos, *first, eos, eos, *second, eos]):
        raise FinetuneError(
            f"the tokenizer in {model_dir} does not build RoBERTa inputs (<s> A </s></s> B </s>); "
            "re-export the model with python -m pipeline export"
        )
    return tokenizer


def position_limit(config) -> int:
    """Longest input the model's position embeddings allow (RoBERTa offsets positions by padding_idx + 1)."""
    limit = int(getattr(config, "max_position_embeddings", 512))
    if config.model_type in ("roberta", "roberta-prelayernorm", "xlm-roberta", "camembert"):
        limit -= int(config.pad_token_id) + 1
    return limit


def _describe_tensors(names: list[str], limit: int = 4) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def load_classifier(source: str, task: TaskData, seed: int):
    """The encoder from ``source`` with a sequence-classification head for ``task``; the head (or the part of it
    whose shape differs, e.g. MNLI's 3-way output for RTE) is initialised from ``seed``.

    Only the head may be new: an encoder tensor missing from ``source`` or of another shape would be
    re-initialised at random by ``ignore_mismatched_sizes`` (fine-tuning a random encoder without a word), so
    that is refused with an error naming the tensors."""
    from transformers import AutoConfig, AutoModelForSequenceClassification, set_seed

    config = AutoConfig.from_pretrained(source)
    config.num_labels = task.num_labels
    config.problem_type = "regression" if task.spec.regression else "single_label_classification"
    if not task.spec.regression:
        config.id2label = dict(enumerate(task.label_names))
        config.label2id = {name: index for index, name in enumerate(task.label_names)}
    set_seed(seed)  # the new head's initialisation
    try:
        model, loading_info = AutoModelForSequenceClassification.from_pretrained(
            source, config=config, ignore_mismatched_sizes=True, output_loading_info=True
        )
    except (OSError, ValueError) as exc:
        raise FinetuneError(f"cannot load a model from {source}: {one_line(exc)}") from None
    # The head is everything outside the encoder (``model.roberta``): e.g. ``classifier.out_proj.weight``.
    encoder_prefix = f"{model.base_model_prefix}."
    mismatched = sorted(
        f"{name} (checkpoint {list(saved)}, model {list(expected)})"
        for name, saved, expected in loading_info["mismatched_keys"] if name.startswith(encoder_prefix)
    )
    missing = sorted(name for name in loading_info["missing_keys"] if name.startswith(encoder_prefix))
    if mismatched or missing:
        problems = []
        if mismatched:
            problems.append(f"shape differs: {_describe_tensors(mismatched)}")
        if missing:
            problems.append(f"missing: {_describe_tensors(missing)}")
        raise FinetuneError(
            f"{source}: the encoder would start from random weights ({'; '.join(problems)}); only the "
            "classification head may differ from the checkpoint"
        )
    return model


# ------------------------------------------------------------------------------------------------ features


@dataclass
class EncodedSplit:
    """Token ids (RoBERTa format, unpadded) and labels of one split."""

    input_ids: list[list[int]]
    labels: list


def encode_examples(tokenizer, examples: glue.Examples, max_length: int) -> EncodedSplit:
    """RoBERTa inputs by the exported tokenizer's own template: ``<s> A </s>`` or ``<s> A </s></s> B </s>``,
    at most ``max_length`` tokens, longest-first truncation of the pair (``load_tokenizer`` checks the template).

    Tokenizers' longest-first gives the same ids as the hand-built loop this replaced (drop one token at a time
    from the longer segment), except for an odd token budget (``max_length`` minus the 4 specials) with both
    segments over half of it and the first the longer: the spare token goes to the first segment, where the loop
    gave it to the second (the default ``max_length`` 128 leaves an even budget)."""
    columns = [list(column) for column in zip(*examples.texts)]
    # Batch call: a pair whose second text is empty still encodes as a pair ("<s> A </s></s></s>").
    encoded = tokenizer(*columns, truncation="longest_first", max_length=max_length)["input_ids"]
    return EncodedSplit(encoded, list(examples.labels))


def make_collator(tokenizer):
    """Right-pads a batch to its longest example with the tokenizer's pad id and builds the attention mask."""
    from transformers import DataCollatorWithPadding

    return DataCollatorWithPadding(tokenizer, padding="longest", return_tensors="pt")


def collate(split: EncodedSplit, indices: Sequence[int], collator, regression: bool) -> dict[str, torch.Tensor]:
    """A padded batch of the given examples: input_ids, attention_mask, labels (float for regression)."""
    batch = collator([{"input_ids": split.input_ids[index], "label": split.labels[index]} for index in indices])
    batch["labels"] = batch["labels"].to(torch.float32 if regression else torch.long)
    return dict(batch)


# ------------------------------------------------------------------------------------------------ training


def resolve_device(config: FinetuneConfig) -> torch.device:
    try:
        device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        raise FinetuneError(f"--device {config.device!r} is not a torch device (e.g. cpu, cuda, cuda:1)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise FinetuneError(f"--device {config.device}: this torch ({torch.__version__}) sees no CUDA GPU")
    if config.precision == "fp16" and device.type != "cuda":
        raise FinetuneError("--precision fp16 needs a GPU (use fp32 or bf16 on CPU)")
    return device


def _autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return torch.autocast(device_type=device.type, enabled=False)
    dtype = torch.float16 if precision == "fp16" else torch.bfloat16
    return torch.autocast(device_type=device.type, dtype=dtype)


def _optimizer(model: torch.nn.Module, config: FinetuneConfig, learning_rate: float) -> torch.optim.Optimizer:
    # Standard BERT/RoBERTa practice: no weight decay on biases and normalisation weights.
    decayed, not_decayed = [], []
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        if parameter.ndim < 2 or "LayerNorm" in name or "layer_norm" in name or name.endswith(".bias"):
            not_decayed.append(parameter)
        else:
            decayed.append(parameter)
    groups = [
        {"params": decayed, "weight_decay": config.weight_decay},
        {"params": not_decayed, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=learning_rate, betas=config.adam_betas, eps=config.adam_eps)


def linear_schedule(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int):
    """Pre-training's schedule (``pipeline.training.schedule.lr_multiplier``): linear warm-up, linear decay to 0.

    The same as transformers' ``get_linear_schedule_with_warmup`` after the warm-up; during it, step ``i`` (0-based)
    gets ``(i + 1) / warmup_steps`` of the peak rather than ``i / warmup_steps`` (no step at learning rate 0)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_multiplier(step, warmup_steps, total_steps))


@torch.no_grad()
def predict(model, split: EncodedSplit, config: FinetuneConfig, device, collator, regression: bool) -> np.ndarray:
    """Class indices (classification) or scores (regression) for every example, in order."""
    model.eval()
    # Length-sorted batches waste little padding; predictions are put back in the original order.
    order = sorted(range(len(split.labels)), key=lambda index: len(split.input_ids[index]))
    outputs = np.empty(len(order), dtype=np.float64 if regression else np.int64)
    for start in range(0, len(order), config.eval_batch_size):
        indices = order[start : start + config.eval_batch_size]
        batch = collate(split, indices, collator, regression)
        with _autocast(device, config.precision):
            logits = model(
                input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)
            ).logits.float()
        values = logits[:, 0] if regression else logits.argmax(dim=-1)
        outputs[indices] = values.cpu().numpy()
    return outputs


def evaluate(model, task: TaskData, dev: dict[str, EncodedSplit], config, device, collator) -> dict[str, float]:
    """The task's metrics over all its dev splits, in percent."""
    metrics: dict[str, float] = {}
    for suffix, split in dev.items():
        predictions = predict(model, split, config, device, collator, task.spec.regression)
        metrics.update(glue.compute_metrics(task.spec, suffix, predictions, split.labels))
    return {key: 100.0 * value for key, value in metrics.items()}


def train_run(
    task: TaskData,
    train: EncodedSplit,
    dev: dict[str, EncodedSplit],
    source: str,
    point: GridPoint,
    seed: int,
    config: FinetuneConfig,
    device: torch.device,
    collator,
    keep_best_state: bool = False,
) -> tuple[RunOutcome, dict[str, torch.Tensor] | None]:
    """Fine-tune once; evaluate after every epoch. Returns the outcome and (if asked) the best epoch's weights."""
    started = time.time()
    model = load_classifier(source, task, seed).to(device)  # seeds python, numpy and torch (transformers.set_seed)
    optimizer = _optimizer(model, config, point.learning_rate)
    steps_per_epoch = math.ceil(len(train.labels) / point.batch_size)
    total_steps = steps_per_epoch * point.epochs
    scheduler = linear_schedule(optimizer, int(config.warmup_ratio * total_steps), total_steps)
    scaler = torch.amp.GradScaler("cuda", enabled=config.precision == "fp16")
    shuffle_generator = torch.Generator().manual_seed(seed)

    epoch_metrics: list[dict[str, float]] = []
    best_score, best_epoch, best_state = math.nan, 0, None
    for epoch in range(1, point.epochs + 1):
        model.train()
        order = torch.randperm(len(train.labels), generator=shuffle_generator).tolist()
        batches = [order[start : start + point.batch_size] for start in range(0, len(order), point.batch_size)]
        bar = _progress(batches, config, desc=f"{task.spec.name} {point.label()} seed={seed} epoch {epoch}",
                        leave=False)
        for indices in bar:
            batch = collate(train, indices, collator, task.spec.regression)
            batch = {key: value.to(device, non_blocking=True) for key, value in batch.items()}
            with _autocast(device, config.precision):
                loss = model(**batch).loss
            scaler.scale(loss).backward()
            if config.max_grad_norm > 0:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        metrics = evaluate(model, task, dev, config, device, collator)
        epoch_metrics.append(metrics)
        score = glue.task_score(task.spec, metrics)
        if best_epoch == 0 or rank_key(score) > rank_key(best_score):
            best_score, best_epoch = score, epoch
            if keep_best_state:
                best_state = {key: value.detach().to("cpu", copy=True) for key, value in model.state_dict().items()}
    outcome = RunOutcome(
        grid_point=point,
        seed=seed,
        best_epoch=best_epoch,
        score=best_score,
        metrics=epoch_metrics[best_epoch - 1],
        epoch_metrics=epoch_metrics,
        seconds=time.time() - started,
    )
    del model, optimizer
    return outcome, best_state


def _progress(iterable: Iterable, config: FinetuneConfig, **kwargs):
    from tqdm.auto import tqdm

    return tqdm(iterable, disable=not config.progress, dynamic_ncols=True, **kwargs)


# ------------------------------------------------------------------------------------------------- outputs


@contextlib.contextmanager
def writing(path: Path):
    """Turns a failure to write ``path`` (an OSError, also one without a file name such as a full disk during
    ``write``, or safetensors' error) into one ``FinetuneOutputError`` line naming ``path`` and the cause."""
    from safetensors import SafetensorError

    try:
        yield
    except OSError as error:
        cause = describe_os_error(OSError(error.errno, error.strerror)) if error.errno else one_line(error)
        raise FinetuneOutputError(f"{path}: cannot write ({cause})") from error
    except SafetensorError as error:
        os_error = library_os_error(error, path)
        cause = describe_os_error(OSError(os_error.errno, os_error.strerror)) if os_error else one_line(error)
        raise FinetuneOutputError(f"{path}: cannot write ({cause})") from error


def write_output_text(path: Path, text: str) -> None:
    """``path`` replaced atomically (``pipeline.io``), its directory created; failures as ``writing`` says."""
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, text)


def save_model_atomically(model, tokenizer, target: Path) -> None:
    """save_pretrained into a staging directory, published in one rename (``pipeline.io.publish_directory``, as
    exports are): ``target`` holds the old model or the new one, never a mix; failures as ``writing`` says."""
    with writing(target):
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = make_staging_dir(target)
        try:
            model.save_pretrained(staging)
            tokenizer.save_pretrained(staging)
            for saved in staging.iterdir():  # safetensors writes 0600; the umask decides, as for other outputs
                os.chmod(saved, default_file_mode())
            publish_directory(staging, target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise


@dataclass
class TaskResult:
    """A task's runs and both selections (see the module docstring)."""

    spec: TaskSpec
    runs: list[RunOutcome]
    selections: dict[str, Selection]  # by selection name
    init_from: str
    train_examples: int
    dev_examples: dict[str, int]


def _format_number(value: float) -> str:
    return "nan" if value != value else f"{value:.1f}"


def markdown_table(results: dict[str, TaskResult], selection: str, row_name: str) -> str:
    """A Table-3-style row: tasks in the paper's order (custom tasks after), the metrics per task, the average."""
    names = [name for name in glue.GLUE_TASK_ORDER if name in results] + [
        name for name in results if name not in glue.GLUE_TASK_ORDER
    ]
    header = ["Model", *(results[name].spec.column_title() for name in names), "Avg."]
    metric_row = ["", *(results[name].spec.metric_title() for name in names), ""]
    cells = [row_name]
    scores = {}
    for name in names:
        chosen = results[name].selections[selection]
        scores[name] = chosen.score
        cells.append("/".join(_format_number(chosen.metrics[key]) for key in results[name].spec.metric_keys()))
    cells.append(_format_number(glue.macro_average(scores)))
    lines = [header, metric_row, ["---"] * len(header), cells]
    table = "\n".join("| " + " | ".join(line) + " |" for line in lines)
    note = (
        f"\nMedian over seeds of the best dev score per run ({selection}); percent. Avg. is the macro average of "
        f"the task scores (MNLI: mean of -m/-mm, MRPC/QQP: mean of F1/Acc, STS-B: mean of Pearson/Spearman)"
        f" over the {len(names)} task(s) shown.\n"
    )
    return table + "\n" + note


def results_json(config: FinetuneConfig, results: dict[str, TaskResult], row_name: str) -> dict:
    tasks = {}
    for name, result in results.items():
        tasks[name] = {
            "score": result.selections[config.selection].score,
            "metrics": result.selections[config.selection].metrics,
            "selection": config.selection,
            "selections": {
                selection_name: {
                    "score": chosen.score,
                    "metrics": chosen.metrics,
                    "grid_point": asdict(chosen.grid_point) if chosen.grid_point else None,
                    "runs": [
                        {"seed": seed, "grid_point": asdict(point), "score": score}
                        for seed, point, score in chosen.median_over
                    ],
                }
                for selection_name, chosen in result.selections.items()
            },
            "init_from": result.init_from,
            "train_examples": result.train_examples,
            "dev_examples": result.dev_examples,
            "runs": [_run_record(run) for run in result.runs],
        }
    scores = {name: task["score"] for name, task in tasks.items()}
    return {
        "model": config.model_path,
        "name": row_name,
        "config": {key: value for key, value in asdict(config).items()},
        "tasks": tasks,
        "average": glue.macro_average(scores) if scores else None,
        "average_over": list(scores),
        "all_glue_tasks": set(glue.GLUE_TASK_ORDER) <= set(scores),
    }


def _finite_or_none(value):
    """JSON-safe copy: nan/inf (only from diverged regression runs) become null, keeping the file strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite_or_none(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_none(item) for item in value]
    return value


# ------------------------------------------------------------------------------------------------- driver


def run_settings(config: FinetuneConfig, task: TaskData, source: str, max_length: int) -> dict:
    """What a logged run depends on besides its grid point and seed; --resume reuses runs only if it matches."""
    return {
        "source": str(Path(source).resolve()),
        "train_examples": len(task.train),
        "dev_examples": {suffix: len(split) for suffix, split in task.dev.items()},
        "max_length": max_length,
        "weight_decay": config.weight_decay,
        "warmup_ratio": config.warmup_ratio,
        "adam_betas": list(config.adam_betas),
        "adam_eps": config.adam_eps,
        "max_grad_norm": config.max_grad_norm,
        "precision": config.precision,
    }


def _run_record(outcome: RunOutcome) -> dict:
    return {
        "grid_point": asdict(outcome.grid_point),
        "seed": outcome.seed,
        "best_epoch": outcome.best_epoch,
        "score": outcome.score,
        "metrics": outcome.metrics,
        "epoch_metrics": outcome.epoch_metrics,
        "seconds": round(outcome.seconds, 3),
    }


def _outcome_from_record(record: dict) -> RunOutcome:
    def number(value):  # the log stores nan as null (strict JSON)
        return math.nan if value is None else float(value)

    return RunOutcome(
        grid_point=GridPoint(**record["grid_point"]),
        seed=int(record["seed"]),
        best_epoch=int(record["best_epoch"]),
        score=number(record["score"]),
        metrics={key: number(value) for key, value in record["metrics"].items()},
        epoch_metrics=[{key: number(value) for key, value in epoch.items()} for epoch in record["epoch_metrics"]],
        seconds=float(record.get("seconds", 0.0)),
    )


def read_run_log(path: Path, settings: dict) -> list[RunOutcome]:
    """Runs logged by an earlier invocation with the same settings (a torn last line is ignored)."""
    if not path.is_file():
        return []
    outcomes = []
    with open(path, encoding="utf-8") as handle:
        lines = handle.read().splitlines()
    for line_number, line in enumerate(lines, start=1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if line_number == len(lines):
                break  # interrupted while appending
            raise FinetuneError(f"{path}:{line_number}: not a run record; remove the file or drop --resume") from None
        if record.get("settings") != settings:
            raise FinetuneError(
                f"{path}: runs were logged with other settings (model, data size or optimiser); "
                "use a new --output-dir or drop --resume"
            )
        outcomes.append(_outcome_from_record(record))
    return outcomes


def append_run_log(path: Path, outcome: RunOutcome, settings: dict) -> None:
    """One JSON line per finished run, flushed to disk so an interruption loses at most the current run."""
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(_finite_or_none({**_run_record(outcome), "settings": settings})) + "\n")
            handle.flush()
            os.fsync(handle.fileno())


def finetune_task(
    task: TaskData,
    source: str,
    tokenizer,
    config: FinetuneConfig,
    device: torch.device,
    task_dir: Path,
    save_best_model: bool,
) -> TaskResult:
    """All grid points x seeds for one task. Each finished run is logged to ``task_dir/runs.jsonl``; with
    ``save_best_model`` the best run's best epoch is (re)saved to ``task_dir/best_model`` whenever a run beats
    every earlier one, so the saved model always matches the log."""
    from transformers import AutoConfig

    model_config = AutoConfig.from_pretrained(source)
    limit = position_limit(model_config)
    max_length = min(config.max_length, limit)
    if max_length < config.max_length:
        logger.warning("%s: --max-length %d exceeds the model's %d; using %d", task.spec.name, config.max_length,
                       limit, limit)
    if getattr(model_config, "vocab_size", None) is not None and len(tokenizer) > model_config.vocab_size:
        raise FinetuneError(
            f"the tokenizer has {len(tokenizer)} tokens but the model at {source} only {model_config.vocab_size}"
        )
    train = encode_examples(tokenizer, task.train, max_length)
    dev = {suffix: encode_examples(tokenizer, examples, max_length) for suffix, examples in task.dev.items()}
    collator = make_collator(tokenizer)

    grid = config.grid_for(task.spec.name)
    seeds = config.seed_list()
    settings = run_settings(config, task, source, max_length)
    log_path = task_dir / "runs.jsonl"
    best_model_dir = task_dir / "best_model"
    if config.resume:
        logged = {(run.grid_point, run.seed): run for run in read_run_log(log_path, settings)}
        # Rewrite without a torn last line, so that the next appended record starts on a line of its own.
        write_output_text(log_path, "".join(
            json.dumps(_finite_or_none({**_run_record(run), "settings": settings})) + "\n" for run in logged.values()
        ))
        if save_best_model and logged and not (best_model_dir / "config.json").is_file():
            raise FinetuneError(f"--resume: {log_path} has runs but {best_model_dir} is missing; drop --resume")
    else:
        logged = {}
        if log_path.exists():
            with writing(log_path):
                log_path.unlink()
    runs: list[RunOutcome] = []
    best_score = max((rank_key(run.score) for run in logged.values()), default=-math.inf)
    # A plain loop rather than transformers' Trainer/hyper-parameter search: each run keeps its best epoch's
    # weights in memory (no checkpoint per epoch on disk) and is logged as it ends, for --resume.
    outer = _progress(None, config, total=len(grid) * len(seeds), desc=f"{task.spec.name} runs")
    for point in grid:
        for seed in seeds:
            if (point, seed) in logged:
                runs.append(logged[(point, seed)])
                outer.update(1)
                continue
            outcome, state = train_run(
                task, train, dev, source, point, seed, config, device, collator, keep_best_state=save_best_model
            )
            runs.append(outcome)
            append_run_log(log_path, outcome, settings)
            if state is not None and (rank_key(outcome.score) > best_score or not best_model_dir.exists()):
                best_score = max(best_score, rank_key(outcome.score))
                model = load_classifier(source, task, seed=0)
                model.load_state_dict(state)
                save_model_atomically(model, tokenizer, best_model_dir)
                del model
            outer.update(1)
            outer.set_postfix(score=f"{outcome.score:.1f}")
    outer.close()

    selections = {name: select(runs, name) for name in ("seed-best", "grid-median")}
    return TaskResult(
        spec=task.spec,
        runs=runs,
        selections=selections,
        init_from=source,
        train_examples=len(train.labels),
        dev_examples={suffix: len(split.labels) for suffix, split in dev.items()},
    )


def _truncate(task: TaskData, config: FinetuneConfig) -> TaskData:
    if config.max_train_examples:
        task.train = glue.Examples(task.train.texts[: config.max_train_examples],
                                   task.train.labels[: config.max_train_examples])
    if config.max_dev_examples:
        task.dev = {
            suffix: glue.Examples(split.texts[: config.max_dev_examples], split.labels[: config.max_dev_examples])
            for suffix, split in task.dev.items()
        }
    return task


def run(config: FinetuneConfig, tasks: Sequence[TaskSpec], data_dir: str | None) -> dict:
    """Fine-tune and evaluate every task; returns the results JSON (also written to ``config.output_dir``)."""
    config.validate()
    _quiet_transformers()
    model_dir = check_model_dir(config.model_path)
    if config.init_from not in (None, "mnli"):
        check_model_dir(config.init_from, "--init-from")
    task_names = [spec.name for spec in tasks]
    if config.init_from == "mnli" and "MNLI" not in task_names:
        raise FinetuneError("--init-from mnli needs MNLI among the tasks (or pass an MNLI model directory)")
    if len(set(task_names)) != len(task_names):
        raise FinetuneError(f"duplicate task names: {', '.join(task_names)}")
    device = resolve_device(config)
    tokenizer = load_tokenizer(str(model_dir))
    output_dir = Path(config.output_dir)
    row_name = config.run_name or model_dir.resolve().name

    # Read every task first: a bad file fails the invocation before any training time is spent.
    task_data = {spec.name: _truncate(glue.load_task(spec, data_dir), config) for spec in tasks}
    # MNLI first when later tasks start from its model.
    order = sorted(task_names, key=lambda name: (not (config.init_from == "mnli" and name == "MNLI"),))

    results: dict[str, TaskResult] = {}
    document: dict = {}
    for name in order:
        task = task_data[name]
        from_mnli_model = name in TASKS_FROM_MNLI or task.spec.directory is None
        if config.init_from == "mnli" and from_mnli_model:
            source = str(output_dir / "MNLI" / "best_model")
        elif config.init_from not in (None, "mnli") and from_mnli_model:
            source = config.init_from
        else:
            source = str(model_dir)
        keep = config.save_best_model or (config.init_from == "mnli" and name == "MNLI")
        logger.info("%s: %d train examples, dev %s; from %s on %s", name, len(task.train),
                    ", ".join(str(len(split)) for split in task.dev.values()), source, device)
        results[name] = finetune_task(task, source, tokenizer, config, device, output_dir / name, keep)
        document = results_json(config, results, row_name)
        write_output_text(output_dir / "results.json", json.dumps(_finite_or_none(document), indent=2) + "\n")
        write_output_text(output_dir / "results.md", markdown_table(results, config.selection, row_name))
    return document


# ---------------------------------------------------------------------------------------------------- CLI


def _float_list(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(item) for item in text.split(",") if item.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(item) for item in text.split(",") if item.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline finetune",
        description="Fine-tune an exported encoder on GLUE-style tasks; median over seeds of best dev scores.",
    )
    parser.add_argument("--model", required=True, help="exported Hugging Face model directory")
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--tasks", default="", help="comma-separated GLUE tasks, or 'all' (CoLA,SST-2,MRPC,STS-B,"
                        "QQP,MNLI,QNLI,RTE)")
    parser.add_argument("--data-dir", help="GLUE download: one sub-directory per task (CoLA/, SST-2/, ...)")
    custom = parser.add_argument_group("custom task (CSV/TSV with a header, or JSONL)")
    custom.add_argument("--train-file")
    custom.add_argument("--dev-file")
    custom.add_argument("--text-fields", help="one or two column names, comma-separated")
    custom.add_argument("--label-field")
    custom.add_argument("--regression", action="store_true", help="float labels, Pearson/Spearman")
    custom.add_argument("--metrics", help="comma-separated: acc, f1, mcc (classification) or pearson, spearman")
    custom.add_argument("--task-name", default="custom")
    grid = parser.add_argument_group("search grid (default: the paper's Table 5 per task)")
    grid.add_argument("--grid", choices=["paper"], default="paper",
                      help="base grid; --lr/--batch-size/--epochs replace its dimensions")
    grid.add_argument("--lr", type=_float_list, help="e.g. 1e-5,3e-5")
    grid.add_argument("--batch-size", type=_int_list, help="e.g. 16,32")
    grid.add_argument("--epochs", type=_int_list, help="e.g. 3,5,10")
    grid.add_argument("--seeds", type=int, default=5, help="runs per grid point (default 5)")
    grid.add_argument("--base-seed", type=int, default=1)
    grid.add_argument("--selection", choices=["seed-best", "grid-median"], default="seed-best")
    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--weight-decay", type=float, default=0.1)
    optim.add_argument("--warmup-ratio", type=float, default=0.06)
    optim.add_argument("--max-grad-norm", type=float, default=1.0)
    optim.add_argument("--max-length", type=int, default=128,
                       help="tokens per example incl. specials (the paper's efficient recipe: 128; longer: 512)")
    optim.add_argument("--eval-batch-size", type=int, default=64)
    optim.add_argument("--precision", choices=["fp32", "fp16", "bf16"], default="fp32")
    optim.add_argument("--device", help="default: cuda when available, else cpu")
    parser.add_argument("--init-from", help="RTE/STS-B/MRPC (and custom tasks) start from this MNLI-fine-tuned "
                        "directory; 'mnli' uses the best MNLI model of this invocation")
    parser.add_argument("--save-best-model", action="store_true", help="save each task's best run to TASK/best_model")
    parser.add_argument("--resume", action="store_true",
                        help="reuse the runs logged in OUTPUT_DIR/TASK/runs.jsonl by an interrupted invocation")
    parser.add_argument("--max-train-examples", type=int)
    parser.add_argument("--max-dev-examples", type=int)
    parser.add_argument("--name", help="row name in the table (default: the model directory's name)")
    parser.add_argument("--no-progress", action="store_true")
    return parser


def tasks_from_args(args: argparse.Namespace) -> list[TaskSpec]:
    specs: list[TaskSpec] = []
    if args.tasks:
        names = glue.GLUE_TASK_ORDER if args.tasks.strip().lower() == "all" else args.tasks.split(",")
        specs.extend(glue.glue_task(name) for name in names if name.strip())
    custom_options = (args.train_file, args.dev_file, args.text_fields, args.label_field)
    if any(custom_options):
        if not all(custom_options):
            raise FinetuneError("a custom task needs --train-file, --dev-file, --text-fields and --label-field")
        metrics = [metric.strip() for metric in args.metrics.split(",")] if args.metrics else None
        specs.append(
            glue.custom_task(
                args.task_name, args.train_file, args.dev_file,
                [name.strip() for name in args.text_fields.split(",")], args.label_field.strip(),
                regression=args.regression, metrics=metrics,
            )
        )
    if not specs:
        raise FinetuneError("nothing to do: pass --tasks and/or a custom task (--train-file ...)")
    return specs


def main(argv: Sequence[str] | None = None) -> int:
    """The command; errors (``PipelineError``, ``OSError``) reach the caller, ``run_cli`` prints them as one line."""
    args = build_parser().parse_args(argv)
    setup_logging(rank=0)  # the "pipeline" logger's messages on stderr, above the tqdm bars
    specs = tasks_from_args(args)
    config = FinetuneConfig(
        model_path=args.model,
        output_dir=args.output_dir,
        learning_rates=args.lr,
        batch_sizes=args.batch_size,
        epoch_counts=args.epochs,
        seeds=args.seeds,
        base_seed=args.base_seed,
        selection=args.selection,
        weight_decay=args.weight_decay,
        warmup_ratio=args.warmup_ratio,
        max_grad_norm=args.max_grad_norm,
        max_length=args.max_length,
        eval_batch_size=args.eval_batch_size,
        precision=args.precision,
        device=args.device,
        init_from=args.init_from,
        save_best_model=args.save_best_model,
        max_train_examples=args.max_train_examples,
        max_dev_examples=args.max_dev_examples,
        progress=not args.no_progress,
        resume=args.resume,
        run_name=args.name,
    )
    run(config, specs, args.data_dir)
    print((Path(args.output_dir) / "results.md").read_text(encoding="utf-8"))
    return 0


if __name__ == "__main__":
    exit_on_data_error(main)
