"""Loss and perplexity curves of a pre-training run: ``python -m pipeline report RUN_DIR [--output PNG]``.

Reads ``RUN_DIR/metrics.jsonl`` (written by ``pipeline.training.trainer``) and draws, side by side, the training loss (with
the validation loss on top) and the validation perplexity of masked, replaced and unchanged tokens. Writes
``RUN_DIR/loss_curves.png`` unless ``--output`` says otherwise. With ``--data-prefix`` (or the run's own
``config.json``), the unigram perplexity of the validation split is drawn as a dashed line: the level a model
reaches by predicting word frequencies alone, without any context.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

from pipeline.data.dataset import open_indexed_dataset
from pipeline.data.meta import load_meta, split_prefix
from pipeline.errors import DataError, PipelineError

KINDS = ("masked", "replaced", "unchanged")
DEFAULT_PNG = "loss_curves.png"


class ReportError(PipelineError):
    """No usable metrics; ``str()`` is one line naming the file."""


def read_metrics(run_dir: str | Path) -> tuple[list[dict], list[dict]]:
    """(train records, eval records) of ``RUN_DIR/metrics.jsonl``; a line cut by a crash is skipped."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise ReportError(f"{path}: not found (is {run_dir} a run directory written by run_pretrain.py --save?)")
    train, evals = [], []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record.get("kind") == "train":
            train.append(record)
        elif record.get("kind") == "eval":
            evals.append(record)
    if not train and not evals:
        raise ReportError(f"{path}: no metrics recorded yet")
    return train, evals


def corruptible_token_counts(prefix: str | Path, split: str) -> np.ndarray:
    """How often each token id occurs in one split of the dataset at ``prefix``, 0 for the ids masking never
    corrupts (<s>, </s>, <pad>, <mask>): the tokens a masked language model is asked to predict."""
    meta = load_meta(prefix)
    vocab_size = int(meta["tokenizer"]["vocab_size"])
    special = meta["special_tokens"]
    indexed = open_indexed_dataset(split_prefix(prefix, split))
    # The whole .bin in one read through megatron-core's reader (documents are stored back to back).
    tokens = indexed.bin_reader.read(indexed.index.dtype, int(np.sum(indexed.sequence_lengths)), 0)
    if tokens.size and int(tokens.max()) >= vocab_size:
        raise DataError(f"{split_prefix(prefix, split)}.bin: token id {int(tokens.max())} >= vocab size {vocab_size}")
    counts = np.bincount(tokens.astype(np.int64), minlength=vocab_size)
    counts[[special["bos"], special["eos"], special["pad"], special["mask"]]] = 0
    return counts


def unigram_perplexity(prefix: str | Path) -> float:
    """Unigram perplexity of the validation split of the preprocessed dataset at ``prefix``.

    Definition: p(t) = (c_train(t) + 1) / (N_train + |C|), the add-one smoothed frequency of token t among the
    corruptible tokens of the *train* split (C: every id except <s>, </s>, <pad>, <mask>, the ids masking never
    corrupts; N_train: their count), so that a token unseen in training keeps a finite cost; the perplexity is
    exp(-mean log p(t)) over the corruptible tokens t of the *valid* split. It is the masked-token perplexity of
    a model that ignores the context and predicts frequencies only: ``ppl_masked`` below it means the model
    uses the context.
    """
    train = corruptible_token_counts(prefix, "train")
    valid = corruptible_token_counts(prefix, "valid")
    if valid.sum() == 0:
        raise DataError(f"{split_prefix(prefix, 'valid')}.bin: no corruptible tokens")
    special = load_meta(prefix)["special_tokens"]
    corruptible_ids = len(train) - len({special[name] for name in ("bos", "eos", "pad", "mask")})
    log_p = np.log(train + 1.0) - math.log(train.sum() + corruptible_ids)
    return float(math.exp(-(valid * log_p).sum() / valid.sum()))


def run_data_prefix(run_dir: str | Path) -> str | None:
    """The --data-prefix a run was trained on, from its ``config.json`` (None if not recorded)."""
    path = Path(run_dir) / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return config.get("data", {}).get("prefix") if isinstance(config.get("data"), dict) else None


def draw(run_dir: str | Path, output: str | Path | None = None, unigram_ppl: float | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # files only: works without a display
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    train, evals = read_metrics(run_dir)
    output = Path(output) if output else run_dir / DEFAULT_PNG
    fig, (ax_loss, ax_ppl) = plt.subplots(1, 2, figsize=(12, 4.5))
    if train:
        ax_loss.plot([r["step"] for r in train], [r["loss"] for r in train], lw=1, alpha=0.8, label="train loss")
    if evals:
        ax_loss.plot([r["step"] for r in evals], [r["loss"] for r in evals], "o-", lw=2, label="validation loss")
        for kind in KINDS:
            points = [(r["step"], r[f"ppl_{kind}"]) for r in evals if r.get(f"ppl_{kind}") is not None]
            if points:
                ax_ppl.plot(*zip(*points), "o-", label=f"{kind} tokens")
        if unigram_ppl is not None:
            ax_ppl.axhline(unigram_ppl, color="black", ls="--", lw=1.2,
                           label=f"unigram (no context) {unigram_ppl:,.0f}")
        ax_ppl.set_yscale("log")
    else:
        ax_ppl.text(0.5, 0.5, "no validation yet", ha="center", va="center", transform=ax_ppl.transAxes)
    ax_loss.set(xlabel="step", ylabel="cross-entropy (nats)", title="loss")
    ax_ppl.set(xlabel="step", ylabel="perplexity", title="validation perplexity by corruption kind")
    for ax in (ax_loss, ax_ppl):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    fig.suptitle(str(run_dir))
    fig.tight_layout()
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=110)
    plt.close(fig)
    return output


def summary(run_dir: str | Path, unigram_ppl: float | None = None) -> str:
    train, evals = read_metrics(run_dir)
    parts = []
    if train:
        parts.append(f"train loss {train[0]['loss']:.3f} (step {train[0]['step']}) -> "
                     f"{train[-1]['loss']:.3f} (step {train[-1]['step']})")
    if evals:
        parts.append(f"validation loss {evals[0]['loss']:.3f} (step {evals[0]['step']}) -> "
                     f"{evals[-1]['loss']:.3f} (step {evals[-1]['step']})")
        masked = evals[-1].get("ppl_masked")
        if masked is not None:
            parts.append(f"masked-token perplexity {masked:,.1f}"
                         + (f" = {masked / unigram_ppl:.2f} x the unigram {unigram_ppl:,.1f}" if unigram_ppl else ""))
    return "; ".join(parts)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline report", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", help="run directory (run_pretrain.py --save)")
    parser.add_argument("--output", help=f"PNG path [default: RUN_DIR/{DEFAULT_PNG}]")
    parser.add_argument("--data-prefix", help="dataset whose unigram perplexity is drawn [default: the run's own "
                        "--data-prefix, from RUN_DIR/config.json, if it is still there]")
    args = parser.parse_args(argv)
    try:
        prefix = args.data_prefix or run_data_prefix(args.run_dir)
        unigram = None
        if args.data_prefix or (prefix and Path(f"{prefix}.meta.json").is_file()):
            unigram = unigram_perplexity(prefix)
        path = draw(args.run_dir, args.output, unigram)
        print(summary(args.run_dir, unigram))
    except PipelineError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
