"""Packed sequences, the sample-index cache, masked samples through DataLoaders, the resumable sharded sampler,
and damaged datasets."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder

from pipeline.data.dataset import (MaskedPretrainingDataset, PackedBatchCollator, PackedSequences,
                              PretrainingBatchSampler, build_pretraining_dataloader, open_indexed_dataset, unpack_batch)
from pipeline.errors import DataError
from pipeline.data.batch import KIND_NONE, SpecialTokens
from pipeline.data.masking import Masker, MaskingCollator, MaskingConfig

SPECIAL = SpecialTokens(bos=0, pad=1, eos=2, unk=3, mask=4)
MASKING = MaskingConfig(rate=0.4, strategy="80-10-10", seed=7)


def _expected_stream(split_prefix: str) -> np.ndarray:
    """The split's documents joined by </s>: what the packed sequences must cover, in order."""
    dataset = IndexedDataset(split_prefix)
    parts = []
    for i in range(len(dataset)):
        if i:
            parts.append(np.array([SPECIAL.eos]))
        parts.append(np.array(dataset[i], dtype=np.int64))
    return np.concatenate(parts)


@pytest.mark.parametrize("seq_len", [16, 128, 2048])
def test_packing_covers_every_token_exactly_once_per_epoch(tiny_dataset_prefix, seq_len):
    split = f"{tiny_dataset_prefix}_train"
    packed = PackedSequences(split, seq_len, SPECIAL, seed=3)
    stream = _expected_stream(split)
    content_len = seq_len - 2
    assert len(packed) == -(-stream.size // content_len)

    for epoch in (0, 1):
        order = packed.epoch_order(epoch)
        assert sorted(order.tolist()) == list(range(len(packed)))
        by_stream_position = [None] * len(packed)
        for i in range(len(packed)):
            sequence = packed.get(epoch, i)
            assert sequence.dtype == np.int64 and sequence.shape == (seq_len,)
            by_stream_position[order[i]] = sequence
        contents = []
        for j, sequence in enumerate(by_stream_position):
            assert sequence[0] == SPECIAL.bos
            real = int(np.count_nonzero(sequence != SPECIAL.pad))
            if j < len(packed) - 1:
                assert real == seq_len  # only the last sequence is padded
            assert sequence[real - 1] == SPECIAL.eos
            assert (sequence[real:] == SPECIAL.pad).all()
            contents.append(sequence[1:real - 1])
        np.testing.assert_array_equal(np.concatenate(contents), stream)
    assert not np.array_equal(packed.epoch_order(0), packed.epoch_order(1))  # epochs reshuffled
    np.testing.assert_array_equal(packed.epoch_order(7), np.random.default_rng([3, 7]).permutation(len(packed)))


def test_documents_with_several_sequences_are_joined_without_separator(tmp_path):
    # A megatron dataset written by other tools: document 0 has two sentences, document 1 one.
    builder = IndexedDatasetBuilder(str(tmp_path / "docs.bin"), dtype=np.uint16)
    builder.add_document(np.array([10, 11, 12, 20, 21]), [3, 2])
    builder.add_document(np.array([30, 31]), [2])
    builder.finalize(str(tmp_path / "docs.idx"))
    packed = PackedSequences(tmp_path / "docs", seq_len=6, special=SPECIAL, seed=0)
    sequences = [packed.sequence(j).tolist() for j in range(len(packed))]
    assert sequences == [[0, 10, 11, 12, 20, 2], [0, 21, 2, 30, 31, 2]]


def test_chunk_starts_written_in_blocks_match_a_search_over_the_stream(tmp_path):
    # Sentences of 0..40 tokens (empty ones too), 1..4 per document; blocks of 3 sequences cross chunk boundaries.
    rng = np.random.default_rng(5)
    builder = IndexedDatasetBuilder(str(tmp_path / "docs.bin"), dtype=np.uint16)
    documents = []
    for _ in range(60):
        sizes = rng.integers(0, 40, size=rng.integers(1, 5)).tolist()
        sizes[0] = max(sizes[0], 1)
        documents.append(rng.integers(5, 100, size=sum(sizes)))
        builder.add_document(documents[-1], sizes)
    builder.finalize(str(tmp_path / "docs.idx"))
    # Documents joined by </s>, the sentences of one document without a separator.
    stream = np.concatenate([part for document in documents for part in ([SPECIAL.eos], document)][1:])
    for seq_len in (3, 7, 64):
        packed = PackedSequences(tmp_path / "docs", seq_len, SPECIAL, seed=0, cache=False)
        unit_starts, stream_tokens = packed._unit_starts()
        assert stream_tokens == len(stream)
        # The reference: each chunk start c * L lies in the last sequence starting at or before it.
        chunk_starts = np.arange(-(-stream_tokens // packed.content_len)) * packed.content_len
        units = np.searchsorted(unit_starts, chunk_starts, side="right") - 1
        expected = np.concatenate([np.stack([units, chunk_starts - unit_starts[units]], axis=1),
                                   [[stream_tokens, 0]]])
        blocks = list(packed._starts_blocks(unit_starts, stream_tokens, block_units=3))
        assert len(blocks) > 20
        np.testing.assert_array_equal(np.concatenate(blocks), expected)
        np.testing.assert_array_equal(packed._starts, expected)
        # Every sequence decodes to its slice of the stream.
        for j in range(len(packed)):
            content = stream[j * packed.content_len:(j + 1) * packed.content_len]
            np.testing.assert_array_equal(packed.sequence(j)[1:1 + len(content)], content)


def test_sample_index_is_cached_atomically_and_reused(tmp_path, tiny_dataset_prefix):
    for suffix in (".bin", ".idx"):
        shutil.copy(f"{tiny_dataset_prefix}_train{suffix}", tmp_path / f"data{suffix}")
    first = PackedSequences(tmp_path / "data", 128, SPECIAL, seed=1)
    cached = sorted(path.name for path in tmp_path.iterdir() if path.suffix == ".npy")
    assert len(cached) == 1 and cached[0].startswith("data.packed-L128-")
    assert not [path for path in tmp_path.iterdir() if ".tmp-" in path.name]
    second = PackedSequences(tmp_path / "data", 128, SPECIAL, seed=1)
    assert isinstance(second._starts, np.memmap)  # loaded from the cache, not rebuilt
    np.testing.assert_array_equal(second._starts, first._build_starts())
    for i in range(len(first)):
        np.testing.assert_array_equal(first.get(0, i), second.get(0, i))
    def starts_files():
        return [path for path in tmp_path.iterdir() if path.suffix == ".npy" and "-order-" not in path.name]

    assert [path.name for path in tmp_path.glob("*-order-*")] == [first.order_path(0).name]  # epoch 0 read
    PackedSequences(tmp_path / "data", 64, SPECIAL, seed=1)
    assert len(starts_files()) == 2  # keyed by seq_len
    # A rewritten .idx (new identity) gets its own index instead of a stale one.
    os.utime(tmp_path / "data.idx", ns=(1, 1))
    PackedSequences(tmp_path / "data", 128, SPECIAL, seed=1)
    assert len(starts_files()) == 3
    # An unwritable directory only costs the cache.
    uncached = PackedSequences(tmp_path / "data", 32, SPECIAL, seed=1, cache=False)
    assert not isinstance(uncached._starts, np.memmap)


def test_masked_dataset_maps_global_index_to_epoch(tiny_dataset_prefix):
    packed = PackedSequences(f"{tiny_dataset_prefix}_train", 128, SPECIAL, seed=5)
    masker = Masker(MASKING, SPECIAL, vocab_size=1000)
    dataset = MaskedPretrainingDataset(packed, masker)
    n = len(packed)
    sample = dataset[n + 3]
    assert sample.sample_index == n + 3
    original = packed.get(1, 3)
    corrupted = sample.corruption != KIND_NONE
    np.testing.assert_array_equal(sample.labels[corrupted], original[corrupted])
    np.testing.assert_array_equal(sample.input_ids[~corrupted], original[~corrupted])
    assert int(corrupted.sum()) == MASKING.counts(128)[0]
    repeated = dataset[n + 3]
    np.testing.assert_array_equal(repeated.input_ids, sample.input_ids)


def test_sampler_resume_continues_an_uninterrupted_run():
    uninterrupted = list(PretrainingBatchSampler(100, 0, micro_batch_size=4, dp_rank=1, dp_size=3))
    assert len(uninterrupted) == 8 == len(PretrainingBatchSampler(100, 0, 4, 1, 3))  # 96 of 100 samples
    resumed = list(PretrainingBatchSampler(100, 36, micro_batch_size=4, dp_rank=1, dp_size=3))
    assert resumed == uninterrupted[3:]
    assert resumed[0] == [40, 41, 42, 43]


def test_sampler_shards_are_disjoint_and_cover_the_global_batch():
    dp_size, micro_batch_size, consumed = 4, 3, 24
    iterators = [iter(PretrainingBatchSampler(None, consumed, micro_batch_size, rank, dp_size))
                 for rank in range(dp_size)]
    for step in range(50):  # endless sampler: crosses many epochs of any small dataset
        batches = [next(iterator) for iterator in iterators]
        flat = [g for batch in batches for g in batch]
        start = consumed + step * micro_batch_size * dp_size
        assert sorted(flat) == list(range(start, start + micro_batch_size * dp_size))
        assert len(set(flat)) == len(flat)
    tail = [list(PretrainingBatchSampler(30, 24, 3, rank, 4, drop_last=False)) for rank in range(4)]
    assert tail == [[[24, 25, 26]], [[27, 28, 29]], [], []]
    assert [len(PretrainingBatchSampler(30, 24, 3, rank, 4, drop_last=False)) for rank in range(4)] == [1, 1, 0, 0]
    with pytest.raises(ValueError):
        PretrainingBatchSampler(10, 11, 1, 0, 1)
    with pytest.raises(ValueError):
        PretrainingBatchSampler(10, 0, 1, 2, 2)


def _batches(prefix, num_workers, consumed=0, total=None, dp_rank=0, dp_size=1, count=None):
    loader = build_pretraining_dataloader(prefix, "train", seq_len=128, masking=MASKING, special=SPECIAL,
                                          vocab_size=1000, micro_batch_size=8, dp_rank=dp_rank, dp_size=dp_size,
                                          consumed_samples=consumed, num_workers=num_workers, seed=11,
                                          total_samples=total)
    batches = []
    for batch in loader:
        batches.append(batch)
        if count is not None and len(batches) == count:
            break
    return batches


def _assert_same_batches(left, right):
    assert len(left) == len(right)
    for a, b in zip(left, right):
        assert a.keys() == b.keys()
        for name in a:
            assert torch.equal(a[name], b[name]), name


def test_identical_batches_with_0_and_2_workers_and_across_epochs(tiny_dataset_prefix):
    packed_len = len(PackedSequences(f"{tiny_dataset_prefix}_train", 128, SPECIAL, seed=11))
    total = (packed_len // 8 + 4) * 8  # runs into the second epoch
    in_process = _batches(tiny_dataset_prefix, num_workers=0, total=total)
    with_workers = _batches(tiny_dataset_prefix, num_workers=2, total=total)
    _assert_same_batches(in_process, with_workers)
    indices = torch.cat([batch["sample_index"] for batch in in_process])
    assert indices.tolist() == list(range(total))
    batch = in_process[0]
    assert batch["input_ids"].shape == (8, 128) and batch["mask_positions"].shape == (8, MASKING.shapes(128).n_mask)
    assert bool(batch["attention_mask"].all())


@pytest.mark.parametrize("strategy", ["80-10-10", "100-0-0"])
def test_packed_worker_batches_unpack_to_the_collated_dict(tiny_dataset_prefix, strategy):
    masking = MaskingConfig(rate=0.3, strategy=strategy, seed=1)
    packed = PackedSequences(f"{tiny_dataset_prefix}_valid", 64, SPECIAL, seed=0)
    dataset = MaskedPretrainingDataset(packed, Masker(masking, SPECIAL, vocab_size=1000))
    samples = [dataset[g] for g in range(len(packed) - 3, len(packed) + 2)]  # includes the padded last sequence
    collator = MaskingCollator(masking, SPECIAL.pad)
    expected = collator(samples)
    unpacked = unpack_batch(*PackedBatchCollator(collator)(samples))
    assert list(unpacked) == list(expected)
    for name, tensor in expected.items():
        assert unpacked[name].dtype == tensor.dtype and torch.equal(unpacked[name], tensor), name
    if strategy == "100-0-0":
        assert unpacked["kept_pred_index"].shape == (5, 0)


def test_resumed_loader_continues_and_ranks_shard(tiny_dataset_prefix):
    uninterrupted = _batches(tiny_dataset_prefix, num_workers=0, count=10)
    resumed = _batches(tiny_dataset_prefix, num_workers=0, consumed=6 * 8, count=4)
    _assert_same_batches(resumed, uninterrupted[6:])
    # Two data-parallel ranks with micro batch 8 see exactly what one rank sees in 16 consecutive samples.
    rank0 = _batches(tiny_dataset_prefix, num_workers=0, dp_rank=0, dp_size=2, count=5)
    rank1 = _batches(tiny_dataset_prefix, num_workers=0, dp_rank=1, dp_size=2, count=5)
    for step in range(5):
        _assert_same_batches([rank0[step]], [uninterrupted[2 * step]])
        _assert_same_batches([rank1[step]], [uninterrupted[2 * step + 1]])


def test_identical_batches_across_processes(tiny_dataset_prefix, tmp_path):
    script = textwrap.dedent(f"""
        import torch
        from tests.test_dataset import _batches
        torch.save(_batches({tiny_dataset_prefix!r}, num_workers=2, consumed=16, count=6), {str(tmp_path / "b.pt")!r})
    """)
    repository = Path(__file__).resolve().parents[1]
    environment = dict(os.environ, PYTHONPATH=str(repository))
    subprocess.run([sys.executable, "-c", script], check=True, env=environment, cwd=repository, timeout=300)
    _assert_same_batches(torch.load(tmp_path / "b.pt"), _batches(tiny_dataset_prefix, num_workers=0, consumed=16,
                                                                  count=6))


# ---------------------------------------------------------------------------------------------------------------
# Damaged or mismatched datasets


def _copy_split(source_prefix: str, directory: Path) -> Path:
    for suffix in (".bin", ".idx"):
        shutil.copy(f"{source_prefix}{suffix}", directory / f"copy{suffix}")
    return directory / "copy"


def test_truncated_bin_is_named(tiny_dataset_prefix, tmp_path):
    prefix = _copy_split(f"{tiny_dataset_prefix}_train", tmp_path)
    size = (tmp_path / "copy.bin").stat().st_size
    os.truncate(tmp_path / "copy.bin", size - 2)
    with pytest.raises(DataError, match=rf"copy.bin: data file truncated \({size - 2} bytes, index expects {size}\)"):
        PackedSequences(prefix, 128, SPECIAL, seed=0)


@pytest.mark.parametrize("keep_bytes", [5, 40, -8])
def test_truncated_idx_is_named(tiny_dataset_prefix, tmp_path, keep_bytes):
    prefix = _copy_split(f"{tiny_dataset_prefix}_train", tmp_path)
    size = (tmp_path / "copy.idx").stat().st_size
    os.truncate(tmp_path / "copy.idx", keep_bytes if keep_bytes > 0 else size + keep_bytes)
    with pytest.raises(DataError, match=r"copy.idx: truncated index"):
        open_indexed_dataset(prefix)


def test_missing_or_foreign_files_are_named(tiny_dataset_prefix, tmp_path):
    prefix = _copy_split(f"{tiny_dataset_prefix}_train", tmp_path)
    (tmp_path / "copy.idx").write_bytes(b"not an index file at all, but long enough for a header")
    with pytest.raises(DataError, match=r"copy.idx: not a megatron-core index file"):
        open_indexed_dataset(prefix)
    (tmp_path / "copy.bin").unlink()
    with pytest.raises(DataError, match=r"copy.bin: dataset file not found"):
        open_indexed_dataset(prefix)


def test_loader_rejects_a_dataset_of_another_vocabulary(tiny_dataset_prefix):
    with pytest.raises(DataError, match=r"lee.meta.json: dataset vocab size 1000 exceeds the model's 500"):
        build_pretraining_dataloader(tiny_dataset_prefix, "train", 128, MASKING, SPECIAL, 500, 8, 0, 1, 0, 0, 1)
    shifted = SpecialTokens(bos=1, pad=0, eos=2, unk=3, mask=4)
    with pytest.raises(DataError, match=r"lee.meta.json: dataset special token ids"):
        build_pretraining_dataloader(tiny_dataset_prefix, "train", 128, MASKING, shifted, 1000, 8, 0, 1, 0, 0, 1)
