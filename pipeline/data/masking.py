"""Masking for MLM and 3ML: the corruption of one packed sequence, and the batch layout every model reads.

For each sequence we corrupt exactly ``k = round(rate * n_real)`` positions (``n_real``: tokens that are not
``<pad>``), chosen uniformly among the corruptible ones (never ``<s>``, ``</s>``, ``<pad>``, ``<mask>``), and
split them with fixed counts by the strategy (default 80% ``<mask>``, 10% random token, 10% unchanged). Because
the counts depend only on ``n_real`` and packing makes almost every sequence exactly ``seq_len`` long, every
sequence of a batch has the same number of ``<mask>`` tokens: the 3ML encoder, which drops them, gets a dense
batch. The index tensors below have *static* lengths computed from ``seq_len`` alone (``MaskingConfig.shapes``);
a shorter (padded) last sequence fills them partly and marks the rest invalid.

The corruption is a pure function of ``(seed, epoch, sample_index)``: the same sample is masked the same way
whatever the number of DataLoader workers, data-parallel ranks or restarts.

The batch layout is documented in ``pipeline.data.batch``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np
import torch

from pipeline.data.batch import (IGNORE_INDEX, KIND_MASKED, KIND_NONE, KIND_REPLACED,
                                 KIND_UNCHANGED, SpecialTokens)

def _round_half_up(x: float) -> int:
    # Python's round() is banker's rounding; counts must not flip between even and odd lengths.
    return int(math.floor(x + 0.5))


def parse_strategy(strategy: str) -> tuple[float, float, float]:
    """``"80-10-10"`` -> (0.8, 0.1, 0.1): percentages of corrupted tokens that become <mask> / random / unchanged."""
    parts = str(strategy).split("-")
    try:
        values = [float(p) for p in parts]
    except ValueError:
        values = []
    if len(values) != 3 or any(v < 0 for v in values) or abs(sum(values) - 100.0) > 1e-6:
        raise ValueError(
            f"masking strategy {strategy!r}: expected three non-negative percentages MASK-RANDOM-UNCHANGED "
            "summing to 100, e.g. 80-10-10, 100-0-0 or 80-0-20")
    return values[0] / 100.0, values[1] / 100.0, values[2] / 100.0


@dataclass(frozen=True)
class StaticShapes:
    """Static lengths of the index tensors for a given seq_len (see module docstring)."""

    seq_len: int
    n_corrupt: int  # Lp: corrupted tokens of a full sequence
    n_mask: int  # Lm: <mask> tokens of a full sequence
    n_random: int
    n_unchanged: int
    encoder_len: int  # Le: kept tokens of a full sequence, rounded up to pad_multiple
    n_kept_pred: int  # Lr: replaced + unchanged


@dataclass(frozen=True)
class MaskingConfig:
    """How sequences are corrupted. One instance is shared by the data pipeline, the models' shape logic and
    the FLOPs accounting, and is saved with every checkpoint."""

    rate: float = 0.4
    """Fraction of real (non-pad) tokens corrupted: 0.15 for RoBERTa, 0.4-0.5 for 3ML."""
    strategy: str = "80-10-10"
    """Percentages of corrupted tokens replaced by <mask>, by a random token, and left unchanged."""
    seed: int = 1234
    """Seed of the corruption; with (epoch, sample_index) it determines every mask."""
    pad_multiple: int = 8
    """The 3ML encoder length is rounded up to this multiple (tensor-core friendly shapes)."""
    fractions: tuple[float, float, float] = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        if not (0.0 < self.rate < 1.0):
            raise ValueError(f"masking rate must be in (0, 1), got {self.rate}")
        if self.pad_multiple < 1:
            raise ValueError(f"pad_multiple must be >= 1, got {self.pad_multiple}")
        object.__setattr__(self, "fractions", parse_strategy(self.strategy))

    def counts(self, n_real: int) -> tuple[int, int, int, int]:
        """(k, n_mask, n_random, n_unchanged) for a sequence with ``n_real`` non-pad tokens."""
        k = _round_half_up(self.rate * n_real)
        f_mask, f_random, _ = self.fractions
        n_mask = min(k, _round_half_up(f_mask * k))
        n_random = min(k - n_mask, _round_half_up(f_random * k))
        return k, n_mask, n_random, k - n_mask - n_random

    def shapes(self, seq_len: int) -> StaticShapes:
        k, n_mask, n_random, n_unchanged = self.counts(seq_len)
        kept = seq_len - n_mask
        encoder_len = -(-kept // self.pad_multiple) * self.pad_multiple
        return StaticShapes(seq_len, k, n_mask, n_random, n_unchanged, encoder_len, n_random + n_unchanged)


@dataclass
class MaskedSample:
    """One corrupted sequence (numpy), before batching."""

    input_ids: np.ndarray  # [L] int64
    labels: np.ndarray  # [L] int64
    corruption: np.ndarray  # [L] int8
    sample_index: int


class Masker:
    """Corrupts packed sequences deterministically; picklable, so DataLoader workers can hold one."""

    def __init__(self, config: MaskingConfig, special: SpecialTokens, vocab_size: int):
        self.config = config
        self.special = special
        self.vocab_size = int(vocab_size)
        specials = np.array(sorted(set(special.as_list())), dtype=np.int64)
        if specials.max() >= self.vocab_size:
            raise ValueError(f"special token id {int(specials.max())} >= vocab size {self.vocab_size}")
        # Random replacements are drawn from the ordinary vocabulary only.
        self._random_pool = np.setdiff1d(np.arange(self.vocab_size, dtype=np.int64), specials)
        # A lookup table instead of np.isin: the same positions at a tenth of the cost (this runs per sample).
        self._corruptible_id = np.ones(self.vocab_size, dtype=bool)
        self._corruptible_id[[special.bos, special.eos, special.pad, special.mask]] = False

    def rng(self, epoch: int, sample_index: int) -> np.random.Generator:
        return np.random.default_rng([self.config.seed, int(epoch), int(sample_index)])

    def __call__(self, tokens: np.ndarray, sample_index: int, epoch: int = 0) -> MaskedSample:
        tokens = np.asarray(tokens, dtype=np.int64)
        n_real = int(np.count_nonzero(tokens != self.special.pad))
        corruptible = np.flatnonzero(self._corruptible_id[tokens])
        k, n_mask, n_random, _ = self.config.counts(n_real)
        if k > corruptible.size:  # a sequence made mostly of separators: corrupt what there is, same split
            scale = corruptible.size / max(k, 1)
            k = corruptible.size
            n_mask = min(k, _round_half_up(n_mask * scale))
            n_random = min(k - n_mask, _round_half_up(n_random * scale))
        rng = self.rng(epoch, sample_index)
        # A uniformly random k-subset in random order (which also shuffles the split into kinds); a plain
        # permutation costs about half of Generator.choice(replace=False) at these sizes.
        chosen = corruptible[rng.permutation(corruptible.size)[:k]]
        masked, replaced, unchanged = chosen[:n_mask], chosen[n_mask:n_mask + n_random], chosen[n_mask + n_random:]

        input_ids = tokens.copy()
        input_ids[masked] = self.special.mask
        input_ids[replaced] = self._random_pool[rng.integers(0, self._random_pool.size, size=replaced.size)]
        labels = np.full_like(tokens, IGNORE_INDEX)
        labels[chosen] = tokens[chosen]
        corruption = np.zeros(tokens.shape, dtype=np.int8)
        corruption[masked] = KIND_MASKED
        corruption[replaced] = KIND_REPLACED
        corruption[unchanged] = KIND_UNCHANGED
        return MaskedSample(input_ids, labels, corruption, int(sample_index))


def _compact(condition: np.ndarray, static_width: int, multiple: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the column indices where ``condition`` holds, ascending, left-aligned in a ``[B, W]`` array
    (pads 0) with its validity mask. ``W`` is ``static_width`` unless a row needs more, rounded up to
    ``multiple``. Vectorised: one stable argsort over the batch instead of a Python loop per row."""
    counts = condition.sum(axis=1)
    width = max(static_width, int(counts.max(initial=0)))
    width = -(-width // multiple) * multiple
    # A stable sort of "not condition" puts the True columns first, in their original (ascending) order.
    order = np.argsort(~condition, axis=1, kind="stable")[:, :width]
    if order.shape[1] < width:  # only when width exceeds the row length (static rounding of a short row)
        order = np.pad(order, ((0, 0), (0, width - order.shape[1])))
    valid = np.arange(width)[None, :] < counts[:, None]
    return np.where(valid, order, 0).astype(np.int64), valid


def collate(samples: Iterable[MaskedSample], config: MaskingConfig, pad_id: int) -> dict[str, torch.Tensor]:
    """Stacks masked samples into the batch layout of the module docstring.

    Index lengths are the static ones of ``config.shapes(seq_len)``; only a pathological sequence (more
    corruptions needed than it has corruptible tokens, or a padded sequence with more kept tokens after
    rounding) can make a batch longer, never shorter.
    """
    samples = list(samples)
    if not samples:
        raise ValueError("collate: empty batch")
    seq_len = samples[0].input_ids.size
    if any(s.input_ids.size != seq_len for s in samples):
        raise ValueError("collate: samples of different lengths in one batch")
    shapes = config.shapes(seq_len)
    input_ids = np.stack([s.input_ids for s in samples])
    labels = np.stack([s.labels for s in samples])
    corruption = np.stack([s.corruption for s in samples])
    # <pad> is never corrupted and never drawn as a random replacement, so this is exactly the real tokens.
    attention_mask = input_ids != pad_id

    pred_positions, pred_valid = _compact(corruption != KIND_NONE, shapes.n_corrupt)
    kept_positions, kept_valid = _compact((corruption != KIND_MASKED) & attention_mask, shapes.encoder_len,
                                          config.pad_multiple)
    mask_positions, mask_valid = _compact(corruption == KIND_MASKED, shapes.n_mask)
    kept_kinds = np.take_along_axis(corruption, kept_positions, axis=1)
    kept_pred_index, kept_pred_valid = _compact(
        kept_valid & ((kept_kinds == KIND_REPLACED) | (kept_kinds == KIND_UNCHANGED)), shapes.n_kept_pred)
    batch = {
        "input_ids": input_ids, "labels": labels, "corruption": corruption, "attention_mask": attention_mask,
        "pred_positions": pred_positions, "pred_valid": pred_valid,
        "kept_positions": kept_positions, "kept_valid": kept_valid,
        "mask_positions": mask_positions, "mask_valid": mask_valid,
        "kept_pred_index": kept_pred_index, "kept_pred_valid": kept_pred_valid,
        "sample_index": np.array([s.sample_index for s in samples], dtype=np.int64),
    }
    return {name: torch.from_numpy(np.ascontiguousarray(value)) for name, value in batch.items()}


class MaskingCollator:
    """A picklable ``collate_fn`` for ``torch.utils.data.DataLoader``."""

    def __init__(self, config: MaskingConfig, pad_id: int):
        self.config = config
        self.pad_id = int(pad_id)

    def __call__(self, samples: Sequence[MaskedSample]) -> dict[str, torch.Tensor]:
        return collate(samples, self.config, self.pad_id)
