"""Where a run's numbers go: ``metrics.jsonl`` (one JSON object per logged step / evaluation), TensorBoard,
the tqdm progress bar (or plain progress lines), and the run's log messages.

Messages go through the standard ``logging`` module (logger ``pipeline``); ``setup_logging`` installs one
handler that prints on global rank 0 only (a filter, so every rank may log the same line without repeating it
N times) and writes through ``tqdm.write`` so a progress bar is not torn by a message.
"""

from __future__ import annotations

import json
import logging
import math
import sys
from pathlib import Path

METRICS_FILE = "metrics.jsonl"
KIND_LABELS = ("masked", "replaced", "unchanged")

log = logging.getLogger("pipeline")


class RankZeroFilter(logging.Filter):
    """Passes records on global rank 0 only (the rank is read when the record is logged)."""

    def __init__(self, rank: int):
        super().__init__()
        self.rank = rank

    def filter(self, record: logging.LogRecord) -> bool:
        return self.rank == 0


class TqdmHandler(logging.Handler):
    """Writes each record with ``tqdm.write`` (above an active progress bar) to stderr."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # logging must never take the run down
            self.handleError(record)


def setup_logging(rank: int) -> None:
    """The ``pipeline`` logger prints INFO and above, on rank 0 only, as plain lines (replaces an earlier set-up)."""
    for handler in list(log.handlers):
        if isinstance(handler, TqdmHandler):
            log.removeHandler(handler)
    handler = TqdmHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    handler.addFilter(RankZeroFilter(rank))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False


class MetricsSink:
    """metrics.jsonl + TensorBoard + progress on rank 0 (other ranks hold an inert sink)."""

    def __init__(self, run_dir: Path | None, is_rank0: bool, start_step: int, total_steps: int,
                 progress_bar: bool):
        self.is_rank0 = is_rank0
        self.total_steps = total_steps
        self.file = None
        self.tensorboard = None
        self.progress = None
        if not is_rank0:
            return
        if run_dir is not None:
            path = Path(run_dir) / METRICS_FILE
            truncate_metrics(path, start_step)
            self.file = open(path, "a", buffering=1)
            from torch.utils.tensorboard import SummaryWriter
            self.tensorboard = SummaryWriter(str(Path(run_dir) / "tensorboard"), purge_step=start_step + 1)
        if progress_bar:
            from tqdm import tqdm
            self.progress = tqdm(total=total_steps, initial=start_step, desc="pre-train", dynamic_ncols=True,
                                 file=sys.stderr)

    def write(self, record: dict) -> None:
        if not self.is_rank0:
            return
        if self.file is not None:
            self.file.write(json.dumps(record) + "\n")
        if self.tensorboard is not None:
            prefix = record["kind"]
            for key, value in record.items():
                if key not in ("kind", "step", "time") and isinstance(value, (int, float)):
                    self.tensorboard.add_scalar(f"{prefix}/{key}", value, record["step"])

    def train_record(self, record: dict) -> None:
        """A training record: written, and shown on the progress bar or as a progress line."""
        self.write(record)
        if self.progress is not None:
            self.progress.set_postfix_str(progress_text(record), refresh=False)
        else:
            log.info(progress_line(record, self.total_steps))

    def eval_record(self, record: dict) -> None:
        self.write(record)
        log.info(eval_line(record))

    def step_done(self) -> None:
        if self.progress is not None:
            self.progress.update(1)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.close()
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.file is not None:
            self.file.close()
        self.progress = self.tensorboard = self.file = None


def safe_exp(x: float) -> float:
    return math.exp(min(x, 700.0))


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def progress_text(record: dict) -> str:
    parts = [f"loss={record['loss']:.4f}", f"lr={record['lr']:.2e}"]
    if record.get("loss_scale") is not None:
        parts.append(f"scale={record['loss_scale']:.0f}")
    parts += [f"{_fmt(record['samples_per_s'], '.1f')} samples/s", f"{_fmt(record['tokens_per_s'], '.0f')} tok/s",
              f"{_fmt(record['tflops_per_device'], '.3g')} TFLOP/s"]
    if record.get("mfu") is not None:
        parts.append(f"MFU={100 * record['mfu']:.1f}%")
    return " ".join(parts)


def progress_line(record: dict, total: int) -> str:
    return f"step {record['step']}/{total} " + progress_text(record)


def eval_line(record: dict) -> str:
    kinds = " ".join(f"ppl_{k}={_fmt(record.get(f'ppl_{k}'), '.2f')}" for k in KIND_LABELS)
    return f"validation step {record['step']}: loss={record['loss']:.4f} ppl={record['ppl']:.2f} {kinds}"


def truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop records written after the checkpoint we resume from (the steps are re-run)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            continue  # a line cut by a crash
    from pipeline.io import write_text_atomic
    write_text_atomic(path, "".join(line + "\n" for line in kept))
