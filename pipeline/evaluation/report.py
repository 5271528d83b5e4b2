"""Loss and perplexity curves of a pre-training run: ``python -m pipeline report RUN_DIR [--output PNG]``.

Reads ``RUN_DIR/metrics.jsonl`` (written by ``pipeline.training.trainer``) and draws, side by side, the training loss (with
the validation loss on top) and the validation perplexity of masked, replaced and unchanged tokens. Writes
``RUN_DIR/loss_curves.png`` unless ``--output`` says otherwise. With ``--data-prefix`` (or the run's own
``config.json``), the unigram perplexity of the validation split is drawn as a dashed line: the level a model
reaches by predicting word frequencies alone, without any context. For a blend (``0.5 wiki 0.3 books 0.2 web``)
it is the blend's unigram level, blended like the trainer blends the validation loss (``unigram_perplexity``).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

from pipeline.data.blend import parse_data_prefix
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


def unigram_perplexity(prefix: str | Path | Sequence[str]) -> float:
    """Unigram perplexity of the validation split of the preprocessed dataset at ``prefix``, or of a blend
    (``"0.7 A 0.3 B"`` or its list, ``pipeline.data.blend.parse_data_prefix``).

    Definition: p(t) = (c_train(t) + 1) / (N_train + |C|), the add-one smoothed frequency of token t among the
    corruptible tokens of the *train* split (C: every id except <s>, </s>, <pad>, <mask>, the ids masking never
    corrupts; N_train: their count), so that a token unseen in training keeps a finite cost; the perplexity is
    exp(-mean log p(t)) over the corruptible tokens t of the *valid* split. It is the masked-token perplexity of
    a model that ignores the context and predicts frequencies only: ``ppl_masked`` below it means the model
    uses the context.

    A blend with weights w_d: p(t) = sum_d w_d p_d(t), the mixture of the sources' smoothed train frequencies
    (every training sample has the same number of predicted tokens, so this mixture is what minimises the
    training loss without context: a context-free model cannot know the source); its cross-entropy CE_d on each
    source's valid split is blended as the trainer blends the validation loss, exp(sum_d w_d CE_d). One source is
    the definition above.
    """
    sources = parse_data_prefix([str(prefix)] if isinstance(prefix, (str, Path)) else list(prefix))
    special = load_meta(sources[0][1])["special_tokens"]
    never_corrupted = len({special[name] for name in ("bos", "eos", "pad", "mask")})
    mixture = None
    valid_counts = []
    for weight, source in sources:
        train = corruptible_token_counts(source, "train")
        valid = corruptible_token_counts(source, "valid")
        if valid.sum() == 0:
            raise DataError(f"{split_prefix(source, 'valid')}.bin: no corruptible tokens")
        if mixture is not None and len(train) != len(mixture):
            raise DataError(f"{source}.meta.json: vocabulary size {len(train)} differs from {sources[0][1]}'s "
                            f"{len(mixture)}: a blend needs one tokenizer")
        smoothed = weight * (train + 1.0) / (train.sum() + len(train) - never_corrupted)
        mixture = smoothed if mixture is None else mixture + smoothed
        valid_counts.append(valid)
    log_p = np.log(mixture)
    cross_entropy = sum(weight * -(valid * log_p).sum() / valid.sum()
                        for (weight, _), valid in zip(sources, valid_counts))
    return float(math.exp(cross_entropy))


def run_data_prefix(run_dir: str | Path) -> str | None:
    """The --data-prefix a run was trained on, from its ``config.json`` (None if not recorded): one prefix or a
    blend as the trainer stores it (``"0.7 A 0.3 B"``)."""
    path = Path(run_dir) / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return config.get("data", {}).get("prefix") if isinstance(config.get("data"), dict) else None


def _unigram_of_run(prefix: str) -> float | None:
    """The unigram level of the run's own data, or None with one line on stderr saying why it is not drawn
    (a dataset moved away, a bad blend): the curves are drawn regardless."""
    try:
        sources = parse_data_prefix(prefix)
        missing = [source for _, source in sources if not Path(f"{source}.meta.json").is_file()]
        if missing:
            print(f"note: no unigram line: {missing[0]}.meta.json not found (the run's data moved?); give "
                  "--data-prefix", file=sys.stderr)
            return None
        return unigram_perplexity(prefix)
    except DataError as error:
        print(f"note: no unigram line: {error}", file=sys.stderr)
        return None


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
    parser.add_argument("--data-prefix", nargs="+", help="dataset whose unigram perplexity is drawn, or a blend "
                        "WEIGHT P WEIGHT P ... [default: the run's own --data-prefix, from RUN_DIR/config.json, if "
                        "it is still there]")
    args = parser.parse_args(argv)
    try:
        if args.data_prefix:
            unigram = unigram_perplexity(args.data_prefix)
        else:
            prefix = run_data_prefix(args.run_dir)
            unigram = _unigram_of_run(prefix) if prefix else None
        path = draw(args.run_dir, args.output, unigram)
        print(summary(args.run_dir, unigram))
    except PipelineError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
