"""Weighted blends of pre-training corpora: ``--data-prefix 0.5 wiki 0.3 books 0.2 web`` (megatron-core's
convention; one prefix alone is the paper's single-corpus setting, weight 1).

Global sample ``g`` goes to source ``d`` and that source's own sample ``s`` (its packed, shuffled epochs as for
a single corpus, ``pipeline.data.dataset``). megatron-core's ``build_blending_indices`` (compiled C++) assigns the
samples of one *period* of ``BLEND_PERIOD`` samples greedily -- after every prefix each source's count is within
one sample of its weight times the prefix length -- and the period repeats, so the index is built once, is
O(period) whatever the run's length, is a pure function of the weights (the seed shuffles inside each source),
and ``g -> (d, s)`` is O(1): a resume from ``consumed_samples`` continues exactly.
"""

from __future__ import annotations

import hashlib
import math
import os
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from pipeline.data.batch import SpecialTokens
from pipeline.data.dataset import (PackedSequences, PretrainingBatchSampler, _save_npy_atomic,
                                   check_dataset_vocabulary, epochs_touched, make_pretraining_dataloader)
from pipeline.data.masking import MaskedSample, Masker, MaskingConfig
from pipeline.data.meta import import_indexed_dataset_module, load_meta, meta_path, split_prefix
from pipeline.errors import DataError

BLEND_PERIOD = 1 << 20  # samples after which the blend pattern repeats (16 MB of index)


def parse_data_prefix(values: str | Sequence[str]) -> list[tuple[float, str]]:
    """``["P"]`` -> ``[(1.0, "P")]``; ``["0.5", "A", "0.3", "B", ...]`` -> normalised ``(weight, prefix)`` pairs.
    DataError (one line) for an odd list, a weight that is not a positive finite number, or a repeated prefix."""
    given = [values] if isinstance(values, str) else [str(value) for value in values]
    values = " ".join(given).split()  # the trainer stores a blend as one space-separated string
    if len(given) == 1 and not _is_number(values[0] if values else ""):
        return [(1.0, given[0])]  # one prefix (which may hold spaces)
    if len(values) == 1:
        return [(1.0, values[0])]
    if not values or len(values) % 2:
        raise DataError(f"--data-prefix {' '.join(values)}: expected one prefix or pairs WEIGHT PREFIX "
                        "(e.g. 0.5 wiki 0.3 books 0.2 web)")
    pairs = []
    for weight_text, prefix in zip(values[0::2], values[1::2]):
        try:
            weight = float(weight_text)
        except ValueError:
            raise DataError(f"--data-prefix: {weight_text!r} (before {prefix}) is not a weight; expected pairs "
                            "WEIGHT PREFIX") from None
        if not math.isfinite(weight) or weight <= 0:
            raise DataError(f"--data-prefix: weight {weight_text} of {prefix} must be > 0 (drop the source "
                            "instead of giving it weight 0)")
        pairs.append((weight, prefix))
    prefixes = [prefix for _, prefix in pairs]
    if len(set(prefixes)) != len(prefixes):
        raise DataError(f"--data-prefix: a prefix is given twice ({' '.join(prefixes)})")
    names = [source_name(prefix) for prefix in prefixes]
    if len(set(names)) != len(names):  # logs and metrics name the sources by it
        raise DataError(f"--data-prefix: two sources share the name (last path component) of their prefix "
                        f"({' '.join(prefixes)}); rename one")
    total = sum(weight for weight, _ in pairs)
    return [(weight / total, prefix) for weight, prefix in pairs]


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def source_name(prefix: str) -> str:
    """The short name of a source in logs and metrics: its prefix's last path component."""
    return Path(prefix).name


def check_blend_sources(sources: Sequence[tuple[float, str]], special: SpecialTokens, vocab_size: int) -> None:
    """Every source exists, fits the model's vocabulary and was tokenized like the others; DataError naming the
    first that is not."""
    fingerprints = {}
    for _, prefix in sources:
        if not meta_path(prefix).is_file() and not Path(f"{split_prefix(prefix, 'train')}.idx").is_file():
            raise DataError(f"{meta_path(prefix)}: data prefix {prefix} not found (no metadata, no "
                            f"{split_prefix(prefix, 'train')}.idx)")
        check_dataset_vocabulary(prefix, special, vocab_size)
        if meta_path(prefix).is_file():
            fingerprints[prefix] = load_meta(prefix)["tokenizer"]["sha256"]
    if len(set(fingerprints.values())) > 1:
        listed = ", ".join(f"{prefix} ({digest[:12]})" for prefix, digest in fingerprints.items())
        raise DataError(f"--data-prefix: the sources were tokenized with different tokenizers: {listed}")


class BlendIndex:
    """``g -> (source, sample of that source)`` for normalised ``weights``; the period's table is a read-only
    memory map of ``path`` (None for one source: the identity)."""

    def __init__(self, weights: Sequence[float], path: Path | None, build: bool):
        self.weights = np.asarray(weights, dtype=np.float64)
        self.num_sources = self.weights.size
        if self.num_sources == 1:
            self._table = None
            self.per_period = np.array([BLEND_PERIOD], dtype=np.int64)
            return
        if self.num_sources > np.iinfo(np.int16).max:
            raise DataError(f"--data-prefix: {self.num_sources} sources; at most {np.iinfo(np.int16).max}")
        if not path.is_file():
            if not build:
                raise DataError(f"{path}: blend index not built (it is written by the index-building rank; see "
                                "that rank's error)")
            self._build(path)
        self._table = np.load(path, mmap_mode="r")
        if self._table.shape != (BLEND_PERIOD, 2):
            raise DataError(f"{path}: corrupt blend index (shape {self._table.shape}); delete it")
        self.per_period = np.bincount(self._table[:, 0], minlength=self.num_sources).astype(np.int64)

    @staticmethod
    def file_name(weights: Sequence[float]) -> str:
        key = ",".join(f"{float(weight).hex()}" for weight in weights) + f"/{BLEND_PERIOD}"
        return f"blend-{hashlib.sha1(key.encode()).hexdigest()[:16]}.npy"

    def _build(self, path: Path) -> None:
        import_indexed_dataset_module()  # megatron.core's package import, without its optimizer warnings
        from megatron.core.datasets import helpers_cpp  # compiled C++, shipped in the wheel

        source = np.zeros(BLEND_PERIOD, dtype=np.int16)
        sample = np.zeros(BLEND_PERIOD, dtype=np.int64)
        helpers_cpp.build_blending_indices(source, sample, self.weights, self.num_sources, BLEND_PERIOD, False)
        _save_npy_atomic(path, np.stack([source.astype(np.int64), sample], axis=1))

    def locate(self, g: int) -> tuple[int, int]:
        """(source, that source's sample index) of global sample ``g``."""
        if self._table is None:
            return 0, int(g)
        period, r = divmod(int(g), BLEND_PERIOD)
        source = int(self._table[r, 0])
        return source, period * int(self.per_period[source]) + int(self._table[r, 1])

    def source_counts(self, samples: int) -> np.ndarray:
        """How many of global samples [0, samples) each source provides."""
        period, r = divmod(int(samples), BLEND_PERIOD)
        counts = period * self.per_period
        if self._table is None:
            return counts + r
        return counts + np.bincount(self._table[:r, 0], minlength=self.num_sources)


class BlendedPretrainingDataset(torch.utils.data.Dataset):
    """Map-style dataset over global sample ``g`` of a blend, returning ``MaskedSample``s (masks seeded by ``g``,
    so two sources never share a mask pattern); ``len()`` is ``total_samples``."""

    def __init__(self, sources: Sequence[PackedSequences], names: Sequence[str], index: BlendIndex, masker: Masker,
                 total_samples: int):
        for packed in sources:
            if len(packed) == 0:
                raise DataError(f"{packed.path_prefix}.idx: dataset split holds no tokens")
        self.sources = list(sources)
        self.names = list(names)
        self.index = index
        self.masker = masker
        self.total_samples = int(total_samples)

    def __len__(self) -> int:
        return self.total_samples

    def __getitem__(self, g: int) -> MaskedSample:
        if g < 0:
            raise IndexError(f"negative sample index {g}")
        source, s = self.index.locate(g)
        packed = self.sources[source]
        epoch, i = divmod(s, len(packed))
        return self.masker(packed.get(epoch, i), sample_index=int(g), epoch=epoch)

    def source_counts(self, samples: int) -> dict[str, int]:
        """Samples each source contributed to global samples [0, samples)."""
        return dict(zip(self.names, self.index.source_counts(samples).tolist()))


def prepare_blend(sources: Sequence[tuple[float, str]], split: str, seq_len: int, special: SpecialTokens, seed: int,
                  consumed_samples: int, total_samples: int, is_builder: bool = True,
                  barrier: Callable[[], None] | None = None,
                  index_dir: str | os.PathLike | None = None) -> tuple[list[PackedSequences], BlendIndex]:
    """The sources' packed sequences and the blend index, built once (as ``prepare_packed_sequences``): the
    builder writes the blend table and, per source, the starts and every epoch order that the global samples
    [consumed_samples, total_samples) reach; everyone waits at ``barrier``; the others map the files."""
    weights = [weight for weight, _ in sources]
    prefixes = [split_prefix(prefix, split) for _, prefix in sources]
    directory = Path(index_dir) if index_dir is not None else Path(prefixes[0]).parent
    blend_path = directory / BlendIndex.file_name(weights)
    error = None
    if is_builder:
        try:
            index = BlendIndex(weights, blend_path, build=True)
            first, end = index.source_counts(consumed_samples), index.source_counts(total_samples)
            for d, prefix in enumerate(prefixes):
                packed = PackedSequences(prefix, seq_len, special, seed, build=True, index_dir=index_dir)
                for epoch in epochs_touched(len(packed), int(first[d]), int(end[d])):
                    packed.build_epoch_order(epoch)
        except BaseException as caught:  # noqa: BLE001 - re-raised after the barrier, so nobody waits forever
            error = caught
    if barrier is not None:
        barrier()
    if error is not None:
        raise error
    index = BlendIndex(weights, blend_path, build=False)
    packed = [PackedSequences(prefix, seq_len, special, seed, build=False, index_dir=index_dir)
              for prefix in prefixes]
    return packed, index


def build_blended_dataloader(sources: Sequence[tuple[float, str]], split: str, seq_len: int, masking: MaskingConfig,
                             special: SpecialTokens, vocab_size: int, micro_batch_size: int, dp_rank: int,
                             dp_size: int, consumed_samples: int, num_workers: int, seed: int, total_samples: int,
                             drop_last: bool = True, prefetch_factor: int = 4, is_index_builder: bool = True,
                             barrier: Callable[[], None] | None = None,
                             index_dir: str | os.PathLike | None = None):
    """DataLoader of masked batch dicts over a weighted blend (``parse_data_prefix``'s pairs) for one
    data-parallel rank; ``loader.dataset.source_counts(n)`` says what each source gave to the first n samples."""
    check_blend_sources(sources, special, vocab_size)
    packed, index = prepare_blend(sources, split, seq_len, special, seed, consumed_samples, total_samples,
                                  is_index_builder, barrier, index_dir)
    dataset = BlendedPretrainingDataset(packed, [source_name(prefix) for _, prefix in sources], index,
                                        Masker(masking, special, vocab_size), total_samples)
    sampler = PretrainingBatchSampler(total_samples, consumed_samples, micro_batch_size, dp_rank, dp_size,
                                      drop_last=drop_last)
    return make_pretraining_dataloader(dataset, sampler, masking, special, num_workers, prefetch_factor)
