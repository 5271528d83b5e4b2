"""Packed, masked pre-training samples over megatron-core indexed datasets, and the resumable sharded sampler.

``PackedSequences`` implements RoBERTa's FULL-SENTENCES input format: the documents of a split, in order, form
one token stream in which documents are joined by ``</s>``; the stream is cut into consecutive chunks of
``seq_len - 2`` tokens and every chunk becomes ``<s> chunk </s>`` — exactly ``seq_len`` tokens, a long document
spilling over several sequences, the last (partial) sequence padded with ``<pad>``. Every token of the split
lands in exactly one sequence per epoch. The start (indexed-dataset sequence, token offset) of every chunk is
computed once with numpy; each epoch visits the sequences in an order shuffled by ``(seed, epoch)``. Both are
``.npy`` files next to the data (or in ``index_dir``) that one process builds (``prepare_packed_sequences``: one
per node or per job, the others wait at a barrier) and every rank and DataLoader worker memory-maps read-only:
no process holds or allocates anything that grows with the corpus (issue 17).

``MaskedPretrainingDataset`` maps a *global* sample index ``g`` (counting across epochs) to a masked sample, so
the masking (``pipeline.data.masking.Masker``) runs in DataLoader workers and depends only on ``g``.
``PretrainingBatchSampler`` walks ``g`` from the number of consumed samples and gives each data-parallel rank its
slice of every global micro-batch: a restart with the saved ``consumed_samples`` continues exactly where the
interrupted run stopped.

megatron-core's ``IndexedDataset`` returns views of its memory map; they are valid only while that object lives,
so ``PackedSequences`` keeps it for its whole life and copies tokens out before returning them.
"""

from __future__ import annotations

import bisect
import collections
import hashlib
import math
import os
import socket
import struct
import sys
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import torch

from pipeline.errors import DataError
from pipeline.io import naming_path, temporary_path
from pipeline.data.batch import SpecialTokens
from pipeline.data.masking import MaskedSample, Masker, MaskingCollator, MaskingConfig
from pipeline.data.meta import import_indexed_dataset_module, load_meta, meta_path, split_prefix

_INDEX_HEADER = b"MMIDIDX\x00\x00"
_INDEX_FIXED_BYTES = 9 + 8 + 1 + 8 + 8  # header, version, dtype code, sequence count, document count
_DTYPE_SIZES = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 8, 7: 4, 8: 2}  # megatron-core DType codes -> item size
_CACHE_FORMAT = 1
_CHECK_BLOCK = 1 << 16  # index entries checked at a time when a dataset is opened (512 KiB of int64 temporaries)
BUILDS = collections.Counter()  # index files this process built, by kind ("starts", "order"): tests count them


def _check_index_file(idx_path: Path) -> tuple[int, int, int]:
    """(item size, sequences, documents) of a .idx file whose size is consistent; DataError otherwise."""
    size = idx_path.stat().st_size
    with open(idx_path, "rb") as stream:
        head = stream.read(_INDEX_FIXED_BYTES)
    if len(head) < _INDEX_FIXED_BYTES:
        raise DataError(f"{idx_path}: truncated index ({size} bytes, not even a header)")
    if head[:9] != _INDEX_HEADER:
        raise DataError(f"{idx_path}: not a megatron-core index file (bad header)")
    version, dtype_code, sequences, documents = struct.unpack("<QBQQ", head[9:])
    if version != 1 or dtype_code not in _DTYPE_SIZES:
        raise DataError(f"{idx_path}: unsupported index version {version} / dtype code {dtype_code}")
    expected = _INDEX_FIXED_BYTES + 4 * sequences + 8 * sequences + 8 * documents
    if size < expected:
        raise DataError(f"{idx_path}: truncated index ({size} bytes, expected {expected})")
    if size != expected:
        raise DataError(f"{idx_path}: index has {size} bytes, expected {expected} (multimodal or corrupt)")
    return _DTYPE_SIZES[dtype_code], sequences, documents


def open_indexed_dataset(path_prefix: str | os.PathLike):
    """megatron-core ``IndexedDataset`` at ``path_prefix`` (.bin/.idx), after checking that neither file is
    missing, truncated or inconsistent; DataError naming the file otherwise."""
    IndexedDataset = import_indexed_dataset_module().IndexedDataset
    idx_path, bin_path = Path(f"{path_prefix}.idx"), Path(f"{path_prefix}.bin")
    for path in (idx_path, bin_path):
        if not path.is_file():
            raise DataError(f"{path}: dataset file not found")
    item_size, sequences, documents = _check_index_file(idx_path)
    if sequences == 0:  # megatron-core cannot memory-map the empty .bin (and its __del__ then fails noisily)
        raise DataError(f"{idx_path}: the split is empty (preprocessed with --valid-fraction 0 or from one document); "
                        "train with --eval-interval 0, or preprocess with --valid-fraction > 0")
    try:
        indexed = IndexedDataset(str(path_prefix))
    except (AssertionError, ValueError) as error:
        raise DataError(f"{idx_path}: corrupt index ({error or 'inconsistent document indices'})") from None
    # Views of megatron-core's memory map, checked a block at a time: every rank and DataLoader worker opens the
    # dataset, and whole-array temporaries (an int64 copy, a diff) would cost each of them O(documents).
    lengths, document_indices = indexed.sequence_lengths, indexed.document_indices
    consistent = documents >= 1 and int(document_indices[0]) == 0
    total_tokens = 0
    for start in range(0, max(sequences, documents), _CHECK_BLOCK):
        block = lengths[start:start + _CHECK_BLOCK]
        if block.size:
            consistent &= int(block.min()) >= 0
            total_tokens += int(block.sum(dtype=np.int64))
        boundaries = document_indices[start:start + _CHECK_BLOCK + 1]
        consistent &= not np.any(boundaries[1:] < boundaries[:-1])
        if not consistent:
            break
    if not consistent:
        raise DataError(f"{idx_path}: corrupt index (inconsistent sequence lengths or document indices)")
    expected_bin = total_tokens * item_size
    if int(indexed.index.sequence_pointers[-1]) + int(lengths[-1]) * item_size != expected_bin:
        raise DataError(f"{idx_path}: corrupt index (sequence pointers do not match lengths)")
    actual_bin = bin_path.stat().st_size
    if actual_bin != expected_bin:
        state = "truncated" if actual_bin < expected_bin else "larger than its index says"
        raise DataError(f"{bin_path}: data file {state} ({actual_bin} bytes, index expects {expected_bin})")
    return indexed


def _file_identity(path: Path) -> str:
    stat = path.stat()
    return hashlib.sha1(f"{stat.st_size}:{stat.st_mtime_ns}:{stat.st_ino}".encode()).hexdigest()[:16]


def _write_npy_atomic(path: Path, shape: tuple[int, ...], dtype, blocks: Iterable[np.ndarray]) -> None:
    """A ``.npy`` file of ``shape`` and ``dtype`` made of ``blocks`` (C-ordered, written as they come: the builder
    need not hold the whole array), under a temporary name renamed into place: readers see the whole file or
    none. The bytes of ``np.save`` of the concatenated blocks."""
    # The host in the name too: node leaders on a shared filesystem may share a process id.
    temporary = temporary_path(path)
    temporary = temporary.with_name(f"{temporary.name}-{socket.gethostname()}")
    with naming_path(path.parent):
        path.parent.mkdir(parents=True, exist_ok=True)  # an --index-dir made on first use
    dtype = np.dtype(dtype)
    try:
        with naming_path(path), open(temporary, "wb") as stream:
            np.lib.format.write_array_header_1_0(stream, {"descr": np.lib.format.dtype_to_descr(dtype),
                                                          "fortran_order": False, "shape": tuple(shape)})
            written = 0
            for block in blocks:
                block = np.ascontiguousarray(block, dtype=dtype)
                stream.write(memoryview(block).cast("B"))
                written += block.nbytes
            if written != math.prod(shape) * dtype.itemsize:
                raise AssertionError(f"{path}: wrote {written} bytes for shape {shape}")  # a bug, not bad input
        os.replace(temporary, path)  # concurrent builders (one per node on a shared filesystem) write equal bytes
    finally:
        temporary.unlink(missing_ok=True)


def _save_npy_atomic(path: Path, array: np.ndarray) -> None:
    """``np.save(path, array)`` under a temporary name renamed into place (``_write_npy_atomic``)."""
    _write_npy_atomic(path, array.shape, array.dtype, [array])


class PackedSequences:
    """FULL-SENTENCES sequences of exactly ``seq_len`` tokens over one split (see the module docstring).

    ``len()`` is the number of sequences per epoch; ``get(epoch, i)`` the i-th sequence of that epoch's shuffled
    order, a fresh int64 array. Picklable (DataLoader workers reopen the files).

    The two indices -- the chunk starts and one permutation per epoch -- are ``.npy`` files next to the data
    (or in ``index_dir``), memory-mapped read-only, so ranks and workers share one copy in the page cache and
    hold nothing that grows with the corpus. ``build=True`` (one process per node or per job: see
    ``prepare_packed_sequences``) writes missing ones; ``build=False`` only maps them and raises DataError when
    one is missing. ``cache=False`` keeps everything in memory (single process, read-only data)."""

    def __init__(self, path_prefix: str | os.PathLike, seq_len: int, special: SpecialTokens, seed: int,
                 cache: bool = True, build: bool = True, index_dir: str | os.PathLike | None = None):
        if seq_len < 3:
            raise ValueError(f"seq_len must be >= 3 (<s>, at least one token, </s>), got {seq_len}")
        self.path_prefix = str(path_prefix)
        self.seq_len = int(seq_len)
        self.special = special
        self.seed = int(seed)
        self.cache = cache
        self.build = build
        self.index_dir = None if index_dir is None else str(index_dir)
        self._open()

    # The stream is made of the indexed dataset's sequences in order; a </s> follows the last sequence of every
    # document except the final one. Megatron datasets written by other tools may hold several sequences
    # (sentences) per document: those are concatenated without a separator.
    def _open(self) -> None:
        self._indexed = open_indexed_dataset(self.path_prefix)
        # Views of megatron-core's memory map (no per-process copy).
        self._lengths = self._indexed.sequence_lengths
        self._document_indices = self._indexed.document_indices
        self._num_units = len(self._lengths)
        self.content_len = self.seq_len - 2
        self._identity = _file_identity(Path(f"{self.path_prefix}.idx"))
        self._starts = self._load_or_build_starts()
        # Row n of the starts file holds (stream tokens, 0): the length of the stream without another pass over it.
        self._num_sequences = int(self._starts.shape[0]) - 1
        self.stream_tokens = int(self._starts[-1, 0])
        self._epoch_orders: dict[int, np.ndarray] = {}

    def __getstate__(self):
        return {"path_prefix": self.path_prefix, "seq_len": self.seq_len, "special": self.special,
                "seed": self.seed, "cache": self.cache, "build": self.build, "index_dir": self.index_dir}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._open()

    def __len__(self) -> int:
        return self._num_sequences

    def _index_path(self, suffix: str) -> Path:
        prefix = Path(self.path_prefix)
        directory = prefix.parent if self.index_dir is None else Path(self.index_dir)
        # v2: the starts file gained its last row (stream tokens); older files are never read.
        return directory / f"{prefix.name}.packed-L{self.seq_len}-v2-{self._identity}{suffix}.npy"

    @property
    def cache_path(self) -> Path:
        # The starts depend on seq_len and the index contents only; the seed shuffles epochs.
        return self._index_path("")

    def order_path(self, epoch: int) -> Path:
        return self._index_path(f"-order-s{self.seed}-e{int(epoch)}")

    def _separator_after(self, unit: int) -> bool:
        # A </s> follows unit u when a document ends there (u + 1 is a document boundary), except after the last.
        # bisect, not np.searchsorted: the .idx arrays are unaligned views, which numpy copies whole to search.
        position = bisect.bisect_left(self._document_indices, unit + 1)
        return (unit + 1 < self._num_units and position < len(self._document_indices)
                and int(self._document_indices[position]) == unit + 1)

    def _unit_starts(self) -> tuple[np.ndarray, int]:
        """(where each indexed-dataset sequence starts in the stream, stream tokens): one cumsum over the sequence
        lengths, each plus the </s> that follows it where a document ends."""
        unit_lengths = np.asarray(self._lengths, dtype=np.int64)  # a copy: the separators are added to it
        document_ends = np.asarray(self._document_indices[1:], dtype=np.int64) - 1
        unit_lengths[document_ends[(document_ends >= 0) & (document_ends < unit_lengths.size - 1)]] += 1
        del document_ends
        unit_starts = np.cumsum(unit_lengths)
        stream_tokens = int(unit_starts[-1]) if unit_starts.size else 0
        unit_starts -= unit_lengths
        return unit_starts, stream_tokens

    def _starts_blocks(self, unit_starts: np.ndarray, stream_tokens: int,
                       block_units: int = 1 << 16) -> Iterator[np.ndarray]:
        """The rows of the starts array [n + 1, 2] int64, a block of indexed-dataset sequences at a time (so the
        builder holds O(documents + block), not O(n)): (sequence, token offset in it) where each of the n chunks
        starts (an offset equal to the sequence's length points at the </s> that follows it); row n is
        (stream tokens, 0)."""
        BUILDS["starts"] += 1
        num_sequences = self._chunk_count(stream_tokens)
        # Chunk c starts at c * L; sequence u holds the chunk starts in [start_u, start_{u+1}): chunks
        # ceil(start_u / L) .. ceil(start_{u+1} / L) - 1. np.repeat lists them in one linear pass (no search).
        first_chunk = -(-unit_starts // self.content_len)
        for first_unit in range(0, unit_starts.size, block_units):
            end_unit = min(first_unit + block_units, unit_starts.size)
            end_chunk = int(first_chunk[end_unit]) if end_unit < unit_starts.size else num_sequences
            block = np.empty((end_chunk - int(first_chunk[first_unit]), 2), dtype=np.int64)
            block[:, 0] = np.repeat(np.arange(first_unit, end_unit, dtype=np.int64),
                                    np.diff(first_chunk[first_unit:end_unit], append=end_chunk))
            block[:, 1] = np.arange(int(first_chunk[first_unit]), end_chunk, dtype=np.int64) * self.content_len
            block[:, 1] -= unit_starts[block[:, 0]]
            yield block
        yield np.array([[stream_tokens, 0]], dtype=np.int64)

    def _build_starts(self) -> np.ndarray:
        """The starts array (``_starts_blocks``) in memory."""
        return np.concatenate(list(self._starts_blocks(*self._unit_starts())))

    def _chunk_count(self, stream_tokens: int) -> int:
        """Sequences (chunks of ``content_len`` tokens, the last one possibly shorter) in a stream."""
        return -(-stream_tokens // self.content_len)

    def _missing(self, path: Path, what: str) -> DataError:
        return DataError(f"{path}: {what} not built (it is written by the index-building rank before the others "
                         "map it; see that rank's error, or delete partial files and restart)")

    def _load_or_build_starts(self) -> np.ndarray:
        if not self.cache:
            return self._build_starts()
        path = self.cache_path
        if path.is_file():
            try:
                starts = np.load(path, mmap_mode="r")
                if starts.ndim == 2 and starts.shape[0] >= 1 and starts.shape[1] == 2 and starts.dtype == np.int64 \
                        and starts.shape[0] - 1 == self._chunk_count(int(starts[-1, 0])):
                    return starts
            except (OSError, ValueError):
                pass  # unreadable cache: the builder rebuilds and overwrites it
            if not self.build:
                raise DataError(f"{path}: corrupt sample index (delete it; the index-building rank rebuilds it)")
        elif not self.build:
            raise self._missing(path, "sample index")
        unit_starts, stream_tokens = self._unit_starts()
        try:
            _write_npy_atomic(path, (self._chunk_count(stream_tokens) + 1, 2), np.int64,
                              self._starts_blocks(unit_starts, stream_tokens))
        except OSError as error:
            raise DataError(f"{path}: cannot write the sample index ({error.strerror or error}); give a writable "
                            "--index-dir") from None
        return np.load(path, mmap_mode="r")

    def build_epoch_order(self, epoch: int) -> Path | None:
        """Writes epoch ``epoch``'s permutation file if it is missing (the index-building process only)."""
        path = self.order_path(epoch)
        if path.is_file():
            return None
        # Shuffling an int32 range draws the same swaps as permutation(n) and halves the memory.
        BUILDS["order"] += 1
        dtype = np.int32 if self._num_sequences < 2**31 else np.int64
        order = np.arange(self._num_sequences, dtype=dtype)
        np.random.default_rng([self.seed, int(epoch)]).shuffle(order)
        try:
            _save_npy_atomic(path, order)
        except OSError as error:
            raise DataError(f"{path}: cannot write the epoch order ({error.strerror or error}); give a writable "
                            "--index-dir") from None
        return path

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The order in which epoch ``epoch`` visits the sequences (a permutation seeded by (seed, epoch)): a
        read-only memory map of its file (built here only when ``build``: DataLoader workers of a distributed
        run find every epoch of the run built beforehand)."""
        epoch = int(epoch)
        order = self._epoch_orders.get(epoch)
        if order is None:
            if not self.cache:
                order = np.arange(self._num_sequences, dtype=np.int32 if self._num_sequences < 2**31 else np.int64)
                np.random.default_rng([self.seed, epoch]).shuffle(order)
            else:
                path = self.order_path(epoch)
                if not path.is_file():
                    if not self.build:
                        raise self._missing(path, f"epoch {epoch} order")
                    self.build_epoch_order(epoch)
                order = np.load(path, mmap_mode="r")
                if order.shape != (self._num_sequences,):
                    raise DataError(f"{path}: corrupt epoch order (shape {order.shape}, expected "
                                    f"({self._num_sequences},)); delete it")
            # Two epochs are kept: a batch (and a worker's queue) may straddle an epoch boundary.
            self._epoch_orders = {e: o for e, o in self._epoch_orders.items() if e == epoch - 1}
            self._epoch_orders[epoch] = order
        return order

    def sequence(self, j: int) -> np.ndarray:
        """Sequence number ``j`` in stream order (unshuffled)."""
        if not 0 <= j < self._num_sequences:
            raise IndexError(f"sequence {j} out of range [0, {self._num_sequences})")
        content = min(self.content_len, self.stream_tokens - j * self.content_len)
        out = np.full(self.seq_len, self.special.pad, dtype=np.int64)
        out[0] = self.special.bos
        unit, offset = int(self._starts[j, 0]), int(self._starts[j, 1])
        position, end = 1, 1 + content
        while position < end:
            length = int(self._lengths[unit])
            if offset < length:
                take = min(length - offset, end - position)
                out[position:position + take] = self._indexed.get(unit, offset, take)  # copies out of the mmap
                position += take
                offset += take
            else:
                if self._separator_after(unit):
                    out[position] = self.special.eos
                    position += 1
                unit, offset = unit + 1, 0
        out[end] = self.special.eos
        return out

    def get(self, epoch: int, i: int) -> np.ndarray:
        """The i-th sequence of epoch ``epoch`` (int64, ``seq_len`` tokens)."""
        if not 0 <= i < self._num_sequences:
            raise IndexError(f"sample {i} out of range [0, {self._num_sequences})")
        return self.sequence(int(self.epoch_order(epoch)[i]))


def epochs_touched(samples_per_epoch: int, first_sample: int, end_sample: int) -> range:
    """The epochs that global samples [first_sample, end_sample) fall in."""
    if end_sample <= first_sample:
        return range(first_sample // samples_per_epoch, first_sample // samples_per_epoch)
    return range(first_sample // samples_per_epoch, (end_sample - 1) // samples_per_epoch + 1)


def prepare_packed_sequences(path_prefix: str | os.PathLike, seq_len: int, special: SpecialTokens, seed: int,
                             sample_range: tuple[int, int | None], is_builder: bool = True,
                             barrier: Callable[[], None] | None = None,
                             index_dir: str | os.PathLike | None = None) -> PackedSequences:
    """``PackedSequences`` whose indices are built once: the builder (``is_builder``) writes the starts and the
    permutation of every epoch that global samples ``sample_range`` = [first, end) touch (end None: the first two
    epochs; later ones are then built on demand by the process that needs them), everyone waits at ``barrier``,
    then the others map the files read-only. A builder that fails still reaches the barrier (so nobody hangs) and
    then raises; the others then report the missing file."""
    error = None
    packed = None
    if is_builder:
        try:
            packed = PackedSequences(path_prefix, seq_len, special, seed, build=True, index_dir=index_dir)
            first, end = sample_range
            end = first + 2 * len(packed) if end is None else end
            for epoch in epochs_touched(len(packed), first, end):
                packed.build_epoch_order(epoch)
        except BaseException as caught:  # noqa: BLE001 - re-raised after the barrier
            error = caught
    if barrier is not None:
        barrier()
    if error is not None:
        raise error
    if packed is not None:
        return packed
    return PackedSequences(path_prefix, seq_len, special, seed, build=sample_range[1] is None, index_dir=index_dir)


class MaskedPretrainingDataset(torch.utils.data.Dataset):
    """Map-style dataset over the global sample index ``g`` (epoch = g // len(packed)), returning
    ``MaskedSample``s; ``len()`` is ``total_samples`` if given, else one epoch."""

    def __init__(self, packed: PackedSequences, masker: Masker, total_samples: int | None = None):
        if len(packed) == 0:
            raise DataError(f"{packed.path_prefix}.idx: dataset split holds no tokens")
        self.packed = packed
        self.masker = masker
        self.total_samples = total_samples

    def __len__(self) -> int:
        return self.total_samples if self.total_samples is not None else len(self.packed)

    def __getitem__(self, g: int) -> MaskedSample:
        if g < 0:
            raise IndexError(f"negative sample index {g}")
        epoch, i = divmod(int(g), len(self.packed))
        return self.masker(self.packed.get(epoch, i), sample_index=int(g), epoch=epoch)


class PretrainingBatchSampler(torch.utils.data.Sampler):
    """Yields this data-parallel rank's micro-batches of global sample indices.

    Global micro-batch ``b`` covers ``g`` in ``[start, start + micro_batch_size * dp_size)`` with
    ``start = consumed_samples + b * micro_batch_size * dp_size``; rank ``r`` gets the ``r``-th slice of
    ``micro_batch_size``. ``total_samples=None`` runs forever (across epochs); otherwise an incomplete last
    global micro-batch is dropped unless ``drop_last=False`` (then each rank yields what is left of its slice,
    possibly nothing)."""

    def __init__(self, total_samples: int | None, consumed_samples: int, micro_batch_size: int, dp_rank: int,
                 dp_size: int, drop_last: bool = True):
        if micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
        if dp_size < 1 or not 0 <= dp_rank < dp_size:
            raise ValueError(f"need 0 <= dp_rank < dp_size, got dp_rank={dp_rank}, dp_size={dp_size}")
        if consumed_samples < 0:
            raise ValueError(f"consumed_samples must be >= 0, got {consumed_samples}")
        if total_samples is not None and consumed_samples > total_samples:
            raise ValueError(f"consumed_samples {consumed_samples} > total_samples {total_samples}")
        self.total_samples = total_samples
        self.consumed_samples = int(consumed_samples)
        self.micro_batch_size = int(micro_batch_size)
        self.dp_rank = int(dp_rank)
        self.dp_size = int(dp_size)
        self.drop_last = drop_last

    @property
    def global_micro_batch(self) -> int:
        return self.micro_batch_size * self.dp_size

    def __len__(self) -> int:
        if self.total_samples is None:
            raise TypeError("an endless PretrainingBatchSampler (total_samples=None) has no length")
        remaining = self.total_samples - self.consumed_samples
        full = remaining // self.global_micro_batch
        if not self.drop_last:
            tail_start = self.dp_rank * self.micro_batch_size
            full += int(remaining % self.global_micro_batch > tail_start)
        return full

    def __iter__(self) -> Iterator[list[int]]:
        start = self.consumed_samples
        while self.total_samples is None or start + self.global_micro_batch <= self.total_samples:
            first = start + self.dp_rank * self.micro_batch_size
            yield list(range(first, first + self.micro_batch_size))
            start += self.global_micro_batch
        if not self.drop_last and start < self.total_samples:
            first = start + self.dp_rank * self.micro_batch_size
            last = min(first + self.micro_batch_size, self.total_samples)
            if first < last:
                yield list(range(first, last))


class PackedBatchCollator:
    """Worker-side ``collate_fn``: the masking collator's batch dict copied into *one* byte buffer.

    A DataLoader worker hands every tensor it returns to the main process through its own shared-memory segment
    (a file descriptor and an mmap each). With the 13 tensors of a masked batch, receiving them cost the main
    process -- the one driving the accelerator -- about a quarter of the CPU time the workers spent building the
    batch (measured at seq_len 128, batch 64); one buffer per batch makes it one segment (about a third of that
    cost), and one pinned transfer when pinning is on. ``unpack_batch`` restores the dict."""

    def __init__(self, collator: MaskingCollator):
        self.collator = collator

    def __call__(self, samples) -> tuple[torch.Tensor, list]:
        batch = self.collator(samples)
        layout, offset = [], 0
        for name, tensor in batch.items():
            nbytes = tensor.numel() * tensor.element_size()
            layout.append((name, tensor.dtype, tuple(tensor.shape), offset, nbytes))
            offset += -(-nbytes // 8) * 8  # 8-byte aligned, so every slice can be viewed as int64
        buffer = torch.empty(offset, dtype=torch.uint8)
        for name, _, _, start, nbytes in layout:
            if nbytes:
                buffer[start:start + nbytes].copy_(batch[name].contiguous().view(-1).view(torch.uint8))
        return buffer, layout


def unpack_batch(buffer: torch.Tensor, layout: list) -> dict[str, torch.Tensor]:
    """The batch dict of a ``PackedBatchCollator`` buffer. Each tensor gets its own (small, memcpy-speed) copy, so
    the batch behaves like an ordinary collated one (``torch.save``, in-place edits); pinned stays pinned."""
    pinned = buffer.is_pinned() if torch.cuda.is_available() else False
    batch = {}
    for name, dtype, shape, start, nbytes in layout:
        view = buffer[start:start + nbytes].view(dtype).view(shape)
        batch[name] = torch.empty(shape, dtype=dtype, pin_memory=pinned).copy_(view)
    return batch


class PretrainingDataLoader(torch.utils.data.DataLoader):
    """A DataLoader yielding masked batch dicts; with workers, batches travel packed (``PackedBatchCollator``)
    and are unpacked here."""

    def __iter__(self):
        iterator = super().__iter__()
        if self.num_workers == 0:
            return iterator
        return (unpack_batch(buffer, layout) for buffer, layout in iterator)


def _max_token_id(prefix: str | os.PathLike, meta: dict) -> int:
    """The largest token id of the dataset: recorded by preprocessing, else (older datasets) read from the data."""
    if "max_token_id" in meta:
        return int(meta["max_token_id"])
    largest = -1
    for split in ("train", "valid"):
        path = Path(f"{split_prefix(prefix, split)}.bin")
        if path.is_file() and path.stat().st_size:
            largest = max(largest, int(np.memmap(path, dtype=np.dtype(meta["dtype"]), mode="r").max()))
    return largest


def check_dataset_vocabulary(prefix: str | os.PathLike, special: SpecialTokens, vocab_size: int) -> None:
    """Raises DataError if ``prefix``'s meta.json (when present) says its ids do not fit ``vocab_size``, contradicts
    its own data (an id >= its vocab size: edited, or from another tokenizer), or its special tokens differ from
    ``special``."""
    if not meta_path(prefix).is_file():
        return
    meta = load_meta(prefix)
    dataset_vocab = meta["tokenizer"]["vocab_size"]
    if dataset_vocab > vocab_size:  # a model vocabulary padded beyond the tokenizer's is fine
        raise DataError(f"{meta_path(prefix)}: dataset vocab size {dataset_vocab} exceeds the model's {vocab_size}")
    largest = _max_token_id(prefix, meta)
    if largest >= dataset_vocab:
        raise DataError(f"{meta_path(prefix)}: the data holds token id {largest}, but the vocab size recorded here is "
                        f"{dataset_vocab} (edited, or the data comes from another tokenizer); preprocess again")
    expected = {"bos": special.bos, "pad": special.pad, "eos": special.eos, "unk": special.unk, "mask": special.mask}
    if meta["special_tokens"] != expected:
        raise DataError(f"{meta_path(prefix)}: dataset special token ids {meta['special_tokens']} differ from the "
                        f"tokenizer's {expected}")


def build_pretraining_dataloader(prefix: str | os.PathLike, split: str, seq_len: int, masking: MaskingConfig,
                                 special: SpecialTokens, vocab_size: int, micro_batch_size: int, dp_rank: int,
                                 dp_size: int, consumed_samples: int, num_workers: int, seed: int,
                                 total_samples: int | None = None, drop_last: bool = True,
                                 prefetch_factor: int = 4, is_index_builder: bool = True,
                                 barrier: Callable[[], None] | None = None,
                                 index_dir: str | os.PathLike | None = None) -> PretrainingDataLoader:
    """DataLoader of masked batch dicts (``pipeline.data.masking`` layout) for one data-parallel rank.

    ``prefix`` is the preprocessing output prefix, ``split`` ``"train"`` or ``"valid"``; ``seed`` shuffles the
    epochs (masks use ``masking.seed``). ``len(loader.dataset.packed)`` is the number of sequences per epoch.
    In a distributed run exactly one process per filesystem passes ``is_index_builder=True`` and every process
    passes the same ``barrier`` (``prepare_packed_sequences``)."""
    check_dataset_vocabulary(prefix, special, vocab_size)
    packed = prepare_packed_sequences(split_prefix(prefix, split), seq_len, special, seed,
                                      (consumed_samples, total_samples), is_index_builder, barrier, index_dir)
    dataset = MaskedPretrainingDataset(packed, Masker(masking, special, vocab_size), total_samples)
    sampler = PretrainingBatchSampler(total_samples, consumed_samples, micro_batch_size, dp_rank, dp_size,
                                      drop_last=drop_last)
    return make_pretraining_dataloader(dataset, sampler, masking, special, num_workers, prefetch_factor)


def make_pretraining_dataloader(dataset, sampler: PretrainingBatchSampler, masking: MaskingConfig,
                                special: SpecialTokens, num_workers: int,
                                prefetch_factor: int = 4) -> PretrainingDataLoader:
    """The DataLoader over a masked dataset (one corpus or a blend) and its batch sampler."""
    extra = {"persistent_workers": True, "prefetch_factor": prefetch_factor} if num_workers > 0 else {}
    context = "fork" if (num_workers > 0 and sys.platform == "linux") else None
    collator = MaskingCollator(masking, special.pad)
    return PretrainingDataLoader(
        dataset, batch_sampler=sampler, num_workers=num_workers,
        collate_fn=PackedBatchCollator(collator) if num_workers > 0 else collator,
        pin_memory=torch.cuda.is_available(), multiprocessing_context=context, **extra)
