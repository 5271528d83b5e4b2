"""Data-path throughput: preprocessing MB/s per worker and DataLoader samples/s at seq_len 128 and 512.

    python bench/data.py [--corpus FILE ...] [--max-mb 16] [--workers 1 2] [--loader-workers 2]

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
import lzma
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
    args = parser.parse_args()

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
