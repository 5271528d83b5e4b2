"""Data-path throughput: preprocessing MB/s per worker and DataLoader samples/s at seq_len 128 and 512.

    python bench/data.py [--corpus FILE ...] [--max-mb 16] [--workers 1 2] [--loader-workers 2]
    python bench/data.py --scaling 1e7 1e8 1e9 [--ranks 1 4]     # corpus-scale rows (issue 17)

The corpus defaults to ``../shared/corpus/*.txt.xz`` next to the repository (decompressed with lzma, an equal
share of ``--max-mb`` taken from each file), else gensim's Lee background corpus. A byte-level BPE is trained on
a sample first (not timed). Goals (issue 2): >= 5 MB/s of raw text per core; >= 20,000 samples/s at seq_len 128
with 2 DataLoader workers.

Preprocessing MB/s per core = MB of text / CPU seconds of the main process and all its worker processes (reaped
before the clock stops). megatron-core's one-time import (~1.5 CPU s per process, whatever the corpus size) is done
before the timed runs and printed on its own, so every row measures the same work. Each row says which tokenizer
engine encoded (``pipeline.data.fast_bpe``: tiktoken where it is exact, else HF tokenizers); the HF-only row, 1 worker,
is the comparison (``--no-hf-comparison`` skips it).
"""

from __future__ import annotations

import argparse
import gc
import glob
import os
import sys
import tempfile
import time
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPOSITORY))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")

from pipeline.data.dataset import PackedSequences, build_pretraining_dataloader  # noqa: E402
from pipeline.data.masking import MaskingConfig  # noqa: E402
from pipeline.data.corpus import open_input_binary  # noqa: E402
from pipeline.data.meta import import_indexed_dataset_module  # noqa: E402
from pipeline.data.preprocess import PreprocessConfig, preprocess  # noqa: E402
from pipeline.data.tokenizer import TrainConfig, load_raw_tokenizer, special_tokens, train_tokenizer  # noqa: E402

PREPROCESS_GOAL_MB_PER_CORE = 5.0
LOADER_GOAL_SAMPLES_128 = 20_000


def default_corpus() -> list[Path]:
    shared = sorted(glob.glob(str(REPOSITORY.parent / "shared" / "corpus" / "*.txt.xz")))
    if shared:
        return [Path(path) for path in shared]
    import gensim

    return [Path(gensim.__file__).parent / "test" / "test_data" / "lee_background.cor"]


def gather_text(files: list[Path], max_bytes: int, output: Path) -> int:
    """Writes up to ``max_bytes`` of decompressed text (an equal share per file, cut at line ends) to ``output``."""
    share = max_bytes // len(files)
    written = 0
    with open(output, "wb") as sink:
        for file in files:
            taken = 0
            with open_input_binary(file) as stream:
                for line in stream:
                    if taken >= share:
                        break
                    sink.write(line)
                    taken += len(line)
            if not line.endswith(b"\n"):
                sink.write(b"\n")
                taken += 1
            sink.write(b"\n")  # a blank line: the next file starts a new document
            written += taken + 1
    return written


def _cpu_seconds() -> float:
    """CPU time of this process plus its reaped children (pool and DataLoader workers, once joined)."""
    times = os.times()
    return times.user + times.system + times.children_user + times.children_system


def bench_preprocess(text: Path, tokenizer: Path, workers: int, directory: Path, paragraphs: bool,
                     fast_tokenizer: bool = True) -> tuple[float, float, dict]:
    """(wall seconds, CPU seconds of all processes, meta)."""
    wall, cpu = time.perf_counter(), _cpu_seconds()
    output_prefix = directory / (f"w{workers}" if fast_tokenizer else f"w{workers}-hf")
    meta = preprocess(PreprocessConfig(inputs=[text], tokenizer=tokenizer, output_prefix=output_prefix,
                                       one_doc_per_line=not paragraphs, valid_fraction=0.01, workers=workers,
                                       replace_invalid=True, fast_tokenizer=fast_tokenizer, show_progress=False))
    return time.perf_counter() - wall, _cpu_seconds() - cpu, meta


def bench_loader(prefix: Path, seq_len: int, special, vocab_size: int, num_workers: int, micro_batch_size: int,
                 seconds: float) -> tuple[float, float]:
    """(samples per wall second, samples per CPU second of the processes producing them)."""
    masking = MaskingConfig(rate=0.4, strategy="80-10-10")
    PackedSequences(f"{prefix}_train", seq_len, special, seed=1)  # builds and caches the sample index (not timed)
    cpu = _cpu_seconds()
    loader = build_pretraining_dataloader(prefix, "train", seq_len, masking, special, vocab_size, micro_batch_size,
                                          dp_rank=0, dp_size=1, consumed_samples=0, num_workers=num_workers, seed=1)
    iterator = iter(loader)
    warmup = 0
    for _ in range(max(2, 2 * num_workers)):  # start the workers and fill their prefetch queues
        warmup += next(iterator)["input_ids"].shape[0]
    samples, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        samples += next(iterator)["input_ids"].shape[0]
    wall_rate = samples / (time.perf_counter() - start)
    del iterator, loader  # joins the workers, so their CPU time is accounted
    gc.collect()
    if num_workers:
        # Workers' CPU only (the trainer's main process would be busy with the GPU anyway); they produced at least
        # the consumed samples (and up to their prefetch queues more), so this rate is a lower bound.
        times = os.times()
        worker_cpu = times.children_user + times.children_system - _children_cpu_before[0]
        return wall_rate, (warmup + samples) / worker_cpu * num_workers
    return wall_rate, (warmup + samples) / (_cpu_seconds() - cpu)


_children_cpu_before = [0.0]


# ----------------------------------------------------------------------------------------------------------------
# Corpus scale (issue 17): index build, first batch and worker memory against the number of tokens


def _memory_kib(field: str) -> int:
    """A /proc/self/status (VmRSS, VmHWM) or smaps_rollup (Private_Dirty, Pss) field, in KiB."""
    for name in ("/proc/self/status", "/proc/self/smaps_rollup"):
        with open(name) as stream:
            for line in stream:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    raise KeyError(field)


def _worker_private_growth(packed, queue) -> None:
    """In a forked process, as a DataLoader worker: read across an epoch boundary, report private memory growth."""
    before = _memory_kib("Private_Dirty")
    n = len(packed)
    for epoch, i in ((0, n - 1), (1, 0), (1, n // 2), (1, n - 1)):
        packed.get(epoch, i)
    queue.put(_memory_kib("Private_Dirty") - before)


def index_build_against_numpy_pass(prefix: str, seq_len: int, scratch: Path, repeats: int = 3) -> tuple[float, float]:
    """(one numpy pass s, index build s), each the best of ``repeats``, measured in turn in this process.

    The numpy pass is the irreducible O(N) work of the index: ``np.cumsum`` over the per-document lengths and one
    ``np.random.Generator.permutation`` of the N sequences. The index build is what one epoch of a run needs
    built: the chunk starts and one epoch's order, both written to their .npy files (each further epoch adds one
    order: about one permutation and a write)."""
    import shutil

    import numpy as np

    from pipeline.data.batch import SpecialTokens
    from pipeline.data.dataset import PackedSequences, open_indexed_dataset

    special = SpecialTokens(bos=0, pad=1, eos=2, unk=3, mask=4)
    indexed = open_indexed_dataset(prefix)  # kept: its lengths are views of its memory map
    lengths = indexed.sequence_lengths
    numpy_pass, build = float("inf"), float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        stream_tokens = int(np.cumsum(lengths, dtype=np.int64)[-1])
        np.random.default_rng(1).permutation(-(-stream_tokens // (seq_len - 2)))
        numpy_pass = min(numpy_pass, time.perf_counter() - start)
        shutil.rmtree(scratch, ignore_errors=True)
        start = time.perf_counter()
        PackedSequences(prefix, seq_len, special, seed=1, index_dir=scratch).build_epoch_order(0)
        build = min(build, time.perf_counter() - start)
    shutil.rmtree(scratch, ignore_errors=True)
    del lengths, indexed
    return numpy_pass, build


def _scaling_rank(prefix: str, rank: int, ranks: int, barrier, results, seq_len: int) -> None:
    import multiprocessing

    from pipeline.data.batch import SpecialTokens
    from pipeline.data.dataset import prepare_packed_sequences

    special = SpecialTokens(bos=0, pad=1, eos=2, unk=3, mask=4)
    masking = MaskingConfig(rate=0.4, strategy="80-10-10")
    import_indexed_dataset_module()
    rss_before = _memory_kib("VmRSS")
    barrier.wait()  # every rank starts together
    start = time.perf_counter()
    packed = prepare_packed_sequences(prefix, seq_len, special, seed=1, sample_range=(0, None),
                                      is_builder=rank == 0, barrier=barrier.wait)
    ready = time.perf_counter() - start
    index_peak = _memory_kib("VmHWM") - rss_before
    start = time.perf_counter()
    loader = build_pretraining_dataloader(Path(prefix).parent / Path(prefix).name[:-len("_train")], "train", seq_len,
                                          masking, special, 1000, 64, dp_rank=rank, dp_size=ranks,
                                          consumed_samples=0, num_workers=2, seed=1)
    next(iter(loader))
    first_batch = time.perf_counter() - start
    del loader
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    worker = context.Process(target=_worker_private_growth, args=(packed, queue))
    worker.start()
    growth = queue.get(timeout=600)
    worker.join()
    barrier.wait()  # the others idle while rank 0 times the index build against a numpy pass
    numpy_pass, build = (index_build_against_numpy_pass(prefix, seq_len, Path(f"{prefix}.build-bench"))
                         if rank == 0 else (None, None))
    results.put((rank, ready, index_peak, first_batch, growth, len(packed), numpy_pass, build))


def bench_scaling(sizes: list[int], rank_counts: list[int], seq_len: int, directory: Path) -> list[tuple]:
    """Rows (tokens, ranks, sequences, cold index build s (slowest rank), peak index MiB (largest rank), first
    batch s, worker private growth KiB across an epoch boundary, numpy pass s, index build s (starts + one
    epoch, ``index_build_against_numpy_pass``))."""
    import multiprocessing

    from pipeline.data.synthetic import write_synthetic_split

    context = multiprocessing.get_context("spawn")  # fresh processes: memory is measured from a clean start
    rows = []
    for tokens in sizes:
        prefix = directory / f"synthetic{tokens}"
        start = time.perf_counter()
        write_synthetic_split(f"{prefix}_train", tokens, seed=tokens)
        print(f"wrote {tokens:,} synthetic tokens in {time.perf_counter() - start:.1f} s")
        for ranks in rank_counts:
            for stale in directory.glob(f"{prefix.name}_train.packed-*"):
                stale.unlink()  # a cold build every time
            barrier, results = context.Barrier(ranks), context.Queue()
            processes = [context.Process(target=_scaling_rank,
                                         args=(f"{prefix}_train", rank, ranks, barrier, results, seq_len))
                         for rank in range(ranks)]
            for process in processes:
                process.start()
            reports = [results.get(timeout=3600) for _ in processes]
            for process in processes:
                process.join()
            builder = next(r for r in reports if r[0] == 0)
            rows.append((tokens, ranks, reports[0][5], max(r[1] for r in reports), max(r[2] for r in reports) / 1024,
                         max(r[3] for r in reports), max(r[4] for r in reports), builder[6], builder[7]))
        prefix_files = list(directory.glob(f"{prefix.name}_train*"))
        for path in prefix_files:
            path.unlink()
    return rows


def print_scaling(rows: list[tuple], seq_len: int, target_tokens: float = 40e9) -> None:
    import numpy as np

    print(f"\ncorpus scale at seq_len {seq_len} (synthetic megatron-core datasets, 2 DataLoader workers, "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f})")
    print(f"{'tokens':>14} {'ranks':>5} {'sequences':>11} {'cold index s':>13} {'index peak MiB':>15} "
          f"{'first batch s':>14} {'worker growth KiB':>18} {'numpy pass s':>13} {'build s':>8} {'build/pass':>11}")
    for tokens, ranks, sequences, build, peak, first, growth, numpy_pass, one_epoch in rows:
        print(f"{tokens:>14,} {ranks:>5} {sequences:>11,} {build:>13.2f} {peak:>15.1f} {first:>14.2f} {growth:>18} "
              f"{numpy_pass:>13.3f} {one_epoch:>8.3f} {one_epoch / numpy_pass:>10.2f}x")
    print("cold index s: rank 0's starts and 2 epoch orders, cold, while all ranks start; numpy pass s: np.cumsum "
          "over the document lengths + one permutation of the sequences; build s: the starts + one epoch's order, "
          "written (best of 3 each, in turn, in one process); goal build/pass <= 2")
    single = [row for row in rows if row[1] == rows[0][1]]
    if len(single) >= 2:
        tokens = np.array([row[0] for row in single], dtype=float)
        for column, name in ((3, "cold index build s"), (4, "index-building rank's peak MiB")):
            slope, intercept = np.polyfit(tokens, np.array([row[column] for row in single]), 1)
            print(f"linear fit to {target_tokens / 1e9:.0f}B tokens ({rows[0][1]} rank(s)): {name} "
                  f"{slope * target_tokens + intercept:,.1f}")
        print(f"index files on disk at {target_tokens / 1e9:.0f}B tokens: starts "
              f"{target_tokens / (seq_len - 2) * 16 / 2**30:.1f} GiB + "
              f"{target_tokens / (seq_len - 2) * 4 / 2**30:.1f} GiB per epoch order (shared by all ranks)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", nargs="+", type=Path, help="text files (plain or .xz/.gz/.bz2)")
    parser.add_argument("--max-mb", type=float, default=16.0, help="MB of decompressed text to preprocess")
    parser.add_argument("--vocab-size", type=int, default=16000)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="preprocessing worker counts")
    parser.add_argument("--loader-workers", type=int, nargs="+", default=[0, 2], help="DataLoader worker counts")
    parser.add_argument("--paragraphs", action="store_true",
                        help="documents are separated by blank lines (default: one document per line)")
    parser.add_argument("--no-hf-comparison", dest="hf_comparison", action="store_false",
                        help="skip the 1-worker preprocessing run with HF tokenizers only")
    parser.add_argument("--micro-batch-size", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=5.0, help="timed seconds per DataLoader measurement")
    parser.add_argument("--scaling", nargs="+", metavar="TOKENS",
                        help="corpus-scale rows instead (issue 17): synthetic datasets of these token counts, e.g. "
                             "1e7 1e8 1e9 (2 bytes per token on disk)")
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 4], help="--scaling: ranks started together")
    parser.add_argument("--scaling-seq-len", type=int, default=128)
    args = parser.parse_args()
    if args.scaling:
        with tempfile.TemporaryDirectory(prefix="bench-scale-") as scratch:
            rows = bench_scaling([int(float(size)) for size in args.scaling], args.ranks, args.scaling_seq_len,
                                 Path(scratch))
        print_scaling(rows, args.scaling_seq_len)
        return 0

    corpus = args.corpus or default_corpus()
    with tempfile.TemporaryDirectory(prefix="bench-data-") as scratch:
        directory = Path(scratch)
        text = directory / "corpus.txt"
        size = gather_text(corpus, int(args.max_mb * 1e6), text)
        print(f"corpus: {len(corpus)} file(s) ({', '.join(path.name for path in corpus)}), {size / 1e6:.1f} MB of "
              f"text; {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
        sample = directory / "sample.txt"
        gather_text([text], min(size, 4_000_000), sample)
        tokenizer = train_tokenizer([sample], directory / "tokenizer.json", TrainConfig(vocab_size=args.vocab_size),
                                    replace_invalid=True)  # as preprocessing below: real corpora hold stray bytes
        raw = load_raw_tokenizer(tokenizer)
        special, vocab_size = special_tokens(raw), raw.get_vocab_size()

        cpu = _cpu_seconds()
        import_indexed_dataset_module()
        print(f"one-time megatron-core import (not timed below): {_cpu_seconds() - cpu:.2f} CPU s")

        rows = []
        runs = [(workers, True) for workers in args.workers] + ([(1, False)] if args.hf_comparison else [])
        for workers, fast_tokenizer in runs:
            seconds, cpu_seconds, meta = bench_preprocess(text, tokenizer, workers, directory, args.paragraphs,
                                                          fast_tokenizer)
            megabytes = meta["text_bytes"] / 1e6
            per_core = megabytes / cpu_seconds
            rows.append((f"preprocess, {workers} worker(s), {meta['tokenizer']['engine']}",
                         f"{megabytes / seconds:.2f} MB/s",
                         f"{per_core:.2f} MB/s/core", f">= {PREPROCESS_GOAL_MB_PER_CORE} MB/s/core",
                         per_core >= PREPROCESS_GOAL_MB_PER_CORE))
        print(f"tokens: {meta['tokens']:,} in {meta['documents']:,} documents")
        if args.hf_comparison and 1 in args.workers:
            identical = all((directory / f"w1{split}").read_bytes() == (directory / f"w1-hf{split}").read_bytes()
                            for split in ("_train.bin", "_train.idx", "_valid.bin", "_valid.idx"))
            print(f"1-worker datasets of both engines byte-identical: {'yes' if identical else 'NO'}")
        prefix = directory / f"w{args.workers[-1]}"
        for seq_len in (128, 512):
            for num_workers in args.loader_workers:
                times = os.times()
                _children_cpu_before[0] = times.children_user + times.children_system
                wall_rate, cpu_rate = bench_loader(prefix, seq_len, special, vocab_size, num_workers,
                                                   args.micro_batch_size, args.seconds)
                goal = (f">= {LOADER_GOAL_SAMPLES_128:,}/s" if seq_len == 128 and num_workers == 2 else "")
                projected = (f"{cpu_rate:,.0f}/s on {num_workers} cores" if num_workers
                             else f"{cpu_rate:,.0f}/s per core")
                rows.append((f"loader seq_len {seq_len}, {num_workers} worker(s)", f"{wall_rate:,.0f} samples/s",
                             projected, goal, cpu_rate >= LOADER_GOAL_SAMPLES_128 if goal else None))
        load = os.getloadavg()[0]

    print()
    print(f"Wall-clock rates share {os.cpu_count()} CPUs with everything else running (load average {load:.1f}); "
          "CPU-time rates say what one dedicated core (or the given number of dedicated worker cores) delivers. "
          "Goals are judged on the CPU-time rates.")
    print(f"{'measurement':<42} {'wall clock':>18} {'per CPU time':>26}  {'goal':<20} met")
    for name, rate, secondary, goal, met in rows:
        verdict = "" if met is None else ("yes" if met else "NO")
        print(f"{name:<42} {rate:>18} {secondary:>26}  {goal:<20} {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
