"""Corpus scale: the packing index and epoch orders are built once and mapped by every rank and worker; reading
holds no memory that grows with the corpus; a resume in a later epoch continues with the same samples."""

import multiprocessing
import tracemalloc

import numpy as np
import pytest

from pipeline.data import dataset as dataset_module
from pipeline.data.batch import SpecialTokens
from pipeline.data.dataset import PackedSequences, build_pretraining_dataloader, prepare_packed_sequences
from pipeline.data.masking import MaskingConfig
from pipeline.data.synthetic import write_synthetic_split
from pipeline.errors import DataError

SPECIAL = SpecialTokens(bos=0, pad=1, eos=2, unk=3, mask=4)
MASKING = MaskingConfig(rate=0.4, strategy="80-10-10", seed=7)


def _rank(prefix, rank, barrier, results):
    before = dict(dataset_module.BUILDS)
    packed = prepare_packed_sequences(prefix, 64, SPECIAL, seed=3, sample_range=(0, 5000),
                                      is_builder=rank == 0, barrier=barrier.wait)
    n = len(packed)
    samples = [packed.get(epoch, i).tolist() for epoch in (0, 1) for i in (0, n - 1)]
    builds = {key: dataset_module.BUILDS[key] - before.get(key, 0) for key in dataset_module.BUILDS}
    results.put((rank, builds, samples, type(packed._starts).__name__))


def test_four_ranks_started_together_build_the_index_once(tmp_path):
    prefix = tmp_path / "corpus"
    write_synthetic_split(prefix, 200_000, mean_document_tokens=300)
    context = multiprocessing.get_context("fork")
    barrier, results = context.Barrier(4), context.Queue()
    processes = [context.Process(target=_rank, args=(prefix, rank, barrier, results)) for rank in range(4)]
    for process in processes:
        process.start()
    reports = sorted(results.get(timeout=300) for _ in processes)
    for process in processes:
        process.join(timeout=60)
        assert process.exitcode == 0
    assert 2500 < len(PackedSequences(prefix, 64, SPECIAL, seed=3, build=False)) < 5000  # samples: 2 epochs
    assert reports[0][1] == {"starts": 1, "order": 2}
    assert all(sum(builds.values()) == 0 for _, builds, _, _ in reports[1:])  # the others only map the files
    assert all(kind == "memmap" for *_, kind in reports)
    assert all(samples == reports[0][2] for _, _, samples, _ in reports)
    assert not list(tmp_path.glob(".*tmp-*"))


def test_epochs_past_the_run_are_not_built_by_readers(tmp_path):
    prefix = tmp_path / "corpus"
    write_synthetic_split(prefix, 50_000)
    packed = prepare_packed_sequences(prefix, 64, SPECIAL, seed=0, sample_range=(0, 10))
    assert packed.order_path(0).is_file() and not packed.order_path(1).exists()
    reader = PackedSequences(prefix, 64, SPECIAL, seed=0, build=False)
    with pytest.raises(DataError, match=r"order-s0-e1\.npy: epoch 1 order not built"):
        reader.get(1, 0)


def _held_and_peak_while_reading(prefix) -> tuple[int, int]:
    builder = PackedSequences(prefix, 128, SPECIAL, seed=0)
    for epoch in (0, 1):
        builder.build_epoch_order(epoch)
    n = len(builder)
    del builder
    tracemalloc.start()
    try:
        reader = PackedSequences(prefix, 128, SPECIAL, seed=0, build=False)  # as a rank that did not build
        opened = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        for epoch, i in ((0, 0), (0, n - 1), (1, 0), (1, n // 2), (1, n - 1)):  # across an epoch boundary
            reader.get(epoch, i)
        held, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return max(opened, held), peak


def test_reader_memory_does_not_grow_with_the_corpus(tmp_path):
    # 10M vs 100M tokens (200 MB): the per-epoch permutation alone would be 0.3 vs 3 MB, the per-document
    # lengths 0.16 vs 1.6 MB, per process; reading holds and allocates only a few sequences' worth.
    usage = {}
    for tokens in (10_000_000, 100_000_000):
        prefix = tmp_path / f"synthetic{tokens}"
        write_synthetic_split(prefix, tokens, mean_document_tokens=500, seed=tokens)
        usage[tokens] = _held_and_peak_while_reading(prefix)
    (small_held, small_peak), (large_held, large_peak) = usage[10_000_000], usage[100_000_000]
    assert large_held < 64 * 1024 and large_peak < 64 * 1024, usage
    assert large_held < small_held + 16 * 1024 and large_peak < small_peak + 16 * 1024, usage


def test_opening_a_dataset_allocates_nothing_that_grows_with_its_documents(tmp_path):
    # 200k vs 1M documents of ~5 tokens: an int64 copy of the lengths and a diff of the document indices would
    # be 3.2 vs 16 MB at every open (every rank, every DataLoader worker); the checks run a block at a time.
    peaks = {}
    for tokens in (1_000_000, 5_000_000):
        prefix = tmp_path / f"synthetic{tokens}"
        documents = write_synthetic_split(prefix, tokens, mean_document_tokens=5, seed=tokens)
        PackedSequences(prefix, 128, SPECIAL, seed=0).build_epoch_order(0)
        tracemalloc.start()
        try:
            reader = PackedSequences(prefix, 128, SPECIAL, seed=0, build=False)
            peaks[documents] = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert len(reader._indexed) == documents
    (few, small_peak), (many, large_peak) = sorted(peaks.items())
    assert many > 4 * few and large_peak < 2 * 2**20 and large_peak < small_peak + 256 * 1024, peaks


def _samples(prefix, consumed, total, workers):
    loader = build_pretraining_dataloader(prefix, "train", 64, MASKING, SPECIAL, 1000, micro_batch_size=4,
                                          dp_rank=0, dp_size=1, consumed_samples=consumed, num_workers=workers,
                                          seed=9, total_samples=total)
    return [(batch["input_ids"].clone(), batch["labels"].clone()) for batch in loader]


def test_resume_in_epoch_three_gives_the_samples_of_an_uninterrupted_run(tiny_dataset_prefix):
    n = len(PackedSequences(f"{tiny_dataset_prefix}_train", 64, SPECIAL, seed=9))
    total = (4 * n) // 4 * 4
    resumed_at = (3 * n + n // 2) // 4 * 4  # in the middle of epoch 3 (counting from 0)
    assert resumed_at // n == 3
    uninterrupted = _samples(tiny_dataset_prefix, 0, total, workers=0)
    resumed = _samples(tiny_dataset_prefix, resumed_at, total, workers=2)
    tail = uninterrupted[resumed_at // 4:]
    assert len(resumed) == len(tail) > 0
    for (ids, labels), (ids_again, labels_again) in zip(tail, resumed):
        assert np.array_equal(ids.numpy(), ids_again.numpy()) and np.array_equal(labels.numpy(), labels_again.numpy())
