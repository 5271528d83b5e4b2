"""Loss and perplexity curves of a pre-training run: ``python -m pipeline report RUN_DIR [--output PNG]``.

Reads ``RUN_DIR/metrics.jsonl`` (written by ``pipeline.training.trainer``) and draws, side by side, the training loss (with
the validation loss on top) and the validation perplexity of masked, replaced and unchanged tokens. Writes
``RUN_DIR/loss_curves.png`` unless ``--output`` says otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

from pipeline.errors import PipelineError

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


def draw(run_dir: str | Path, output: str | Path | None = None) -> Path:
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


def summary(run_dir: str | Path) -> str:
    train, evals = read_metrics(run_dir)
    parts = []
    if train:
        parts.append(f"train loss {train[0]['loss']:.3f} (step {train[0]['step']}) -> "
                     f"{train[-1]['loss']:.3f} (step {train[-1]['step']})")
    if evals:
        parts.append(f"validation loss {evals[0]['loss']:.3f} (step {evals[0]['step']}) -> "
                     f"{evals[-1]['loss']:.3f} (step {evals[-1]['step']})")
    return "; ".join(parts)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline report", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", help="run directory (run_pretrain.py --save)")
    parser.add_argument("--output", help=f"PNG path [default: RUN_DIR/{DEFAULT_PNG}]")
    args = parser.parse_args(argv)
    try:
        path = draw(args.run_dir, args.output)
        print(summary(args.run_dir))
    except ReportError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
