"""Training throughput of MLM vs 3ML, measured side by side in one run, through the product code path.

Each row is one (preset, architecture, masking rate, precision) built with ``model.build_model`` and stepped by
a DeepSpeed engine made from a ``ds_configs/`` file with ``pipeline.training.config.build_deepspeed_config`` by
``pipeline.training.engine.build_engine`` -- the one builder ``run_pretrain.py`` trains with (same parameter
groups, weight decay and LR schedule). Batches are masked by ``pipeline.data.masking`` from fixed random token
sequences (the content does not change the work) and live on the device before timing starts; the data
loader is timed separately (``loader ms/batch``: DataLoader with workers, masking + collation, per micro batch)
so it can be compared with the step time.

Reported per row: ms/step (median of the timed steps), samples/s, achieved model TFLOP/s, MFU against the
matmul peak measured in the same run, the measured speedup over the first ``mlm`` row of the same preset and
precision, and the speedup ``pipeline.training.flops`` predicts for the same pair. Model FLOPs follow the paper's
Appendix D; for TFLOP/s and MFU the step counts forward + 2x backward (``--fwd-bwd-factor 3``, the
Megatron/PaLM MFU convention), the predicted speedups do not depend on that factor.

GPU (defaults when CUDA is available): the paper's large (seq 128) and base (seq 512) presets, bf16 and fp16::

    python -m bench.throughput --json bench_throughput.json

CPU (what CI runs; tiny preset, fp32)::

    python -m bench.throughput --presets tiny --seq-len 64 --batch 8 --steps 3 --warmup 1 --precisions fp32
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from model.config import ModelConfig
from pipeline.training.flops import MFU_FWD_BWD_FACTOR
from pipeline.data.batch import SpecialTokens
from pipeline.data.masking import Masker, MaskingCollator, MaskingConfig
from pipeline.io import write_json_atomic

# Special ids of a RoBERTa-style vocabulary; the benchmark needs no tokenizer.
SPECIAL = SpecialTokens(bos=0, pad=1, eos=2, unk=3, mask=4)
DEFAULT_RUNS = "mlm:0.15,mlm:0.5,3ml-self:0.4,3ml-self:0.5,3ml-cross:0.5"
GPU_SHAPES = {"large": (128, 256), "base": (512, 64)}  # preset -> (seq_len, micro batch) on one H100


@dataclass
class Row:
    preset: str
    architecture: str
    masking_rate: float
    precision: str
    batch: int
    seq_len: int
    encoder_len: int
    ms_per_step: float
    samples_per_s: float
    tflops: float
    mfu: float
    loader_ms_per_batch: float
    measured_speedup: float | None = None
    predicted_speedup: float | None = None
    final_loss: float | None = None
    compiled: bool = False
    linear_forward: str = "auto"


def measure_matmul_peak(device: torch.device, dtype: torch.dtype, size: int, repeats: int) -> float:
    """Achieved TFLOP/s of a square matmul: the practical peak that MFU is measured against."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    _sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    _sync(device)
    return 2.0 * size ** 3 * repeats / (time.perf_counter() - start) / 1e12


def _train_step(engine, micro: dict):
    """One forward/backward/optimizer step of the DeepSpeed engine, as ``pipeline.training.trainer`` does it."""
    output = engine(micro)
    engine.backward(output.loss)
    engine.step()
    return output


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


class SyntheticPackedDataset(torch.utils.data.Dataset):
    """Fixed random ``<s> ... </s>`` sequences, masked per sample exactly as the training dataset does."""

    def __init__(self, masker: Masker, seq_len: int, vocab_size: int, size: int, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.tokens = rng.integers(5, vocab_size, size=(size, seq_len), dtype=np.int64)
        self.tokens[:, 0] = SPECIAL.bos
        self.tokens[:, -1] = SPECIAL.eos
        self.masker = masker

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, index: int):
        return self.masker(self.tokens[index], sample_index=index, epoch=0)


def time_loader(dataset, collator, batch: int, workers: int, batches: int) -> float:
    """Milliseconds per micro batch from a DataLoader with ``workers`` processes, after its start-up."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch, shuffle=False, num_workers=workers,
                                         collate_fn=collator, pin_memory=torch.cuda.is_available(),
                                         persistent_workers=False)
    iterator = iter(loader)
    next(iterator)  # worker start-up is a one-off cost
    start = time.perf_counter()
    count = 0
    for _ in range(batches):
        try:
            next(iterator)
        except StopIteration:
            break
        count += 1
    elapsed = time.perf_counter() - start
    del iterator, loader
    return 1000.0 * elapsed / max(count, 1)


def build_bench_engine(model, seq_len: int, batch: int, precision: str, args):
    """The engine of one row: ``ds_configs/{zero}_{precision}.json`` with one device's batch, built by the
    training's own builder."""
    from deepspeed.accelerator import get_accelerator

    from pipeline.training.config import TrainingConfig, build_deepspeed_config
    from pipeline.training.engine import build_engine

    training = TrainingConfig(seq_len=seq_len, global_batch_size=batch, micro_batch_size=batch,
                              train_steps=10 ** 6, lr=args.lr, seed=args.seed, warmup_proportion=0.0)
    accelerator = get_accelerator()
    ds_path = Path(args.ds_config_dir) / f"{args.zero}_{precision}.json"
    ds_config = build_deepspeed_config(ds_path, training, 1, accelerator.device_name(),
                                       accelerator.is_fp16_supported(), accelerator.is_bf16_supported())
    return build_engine(model, training, ds_config, compile="layers" if args.compile else "none")


def run_one(preset: str, arch: str, rate: float, precision: str, seq_len: int, batch: int, args,
            device: torch.device, peak_tflops: float) -> Row:
    from model import build_model
    from pipeline.training.flops import training_flops

    overrides = {"max_positions": max(seq_len, ModelConfig.preset(preset, arch).max_positions)}
    if args.vocab_size:
        overrides["vocab_size"] = args.vocab_size
    config = ModelConfig.preset(preset, arch, **overrides)
    if args.no_dropout:
        config = ModelConfig.from_dict({**config.to_dict(), "hidden_dropout": 0.0, "attention_dropout": 0.0})
    masking = MaskingConfig(rate=rate, strategy=args.strategy, seed=args.seed, pad_multiple=args.pad_multiple)
    masker = Masker(masking, SPECIAL, config.vocab_size)
    collator = MaskingCollator(masking, SPECIAL.pad)
    dataset = SyntheticPackedDataset(masker, seq_len, config.vocab_size,
                                     size=batch * max(args.steps + args.warmup, args.loader_batches + 1))

    model = build_model(config, init_seed=args.seed)
    engine = build_bench_engine(model, seq_len, batch, precision, args)

    batches = [collator([dataset[i * batch + j] for j in range(batch)]) for i in range(args.steps + args.warmup)]
    batches = [{k: v.to(device, non_blocking=True) for k, v in b.items()} for b in batches]
    times, loss = [], None
    for i, micro in enumerate(batches):
        _sync(device)
        start = time.perf_counter()
        output = _train_step(engine, micro)
        _sync(device)
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
        loss = output.loss
    final_loss = float(loss.detach().float().cpu())
    if args.profile:
        profile_steps(engine, batches[-3:], device, Path(args.profile),
                      f"{preset} {arch} rate {rate} {precision}{' compiled' if args.compile else ''}")

    loader_ms = time_loader(dataset, collator, batch, args.loader_workers, args.loader_batches)
    seconds = statistics.median(times)
    flops = training_flops(config, batch, seq_len, rate, mask_fraction=masking.fractions[0],
                           fwd_bwd_factor=args.fwd_bwd_factor)
    tflops = flops / seconds / 1e12
    row = Row(preset, arch, rate, precision, batch, seq_len, masking.shapes(seq_len).encoder_len
              if arch != "mlm" else seq_len, 1000.0 * seconds, batch / seconds, tflops, tflops / peak_tflops,
              loader_ms, final_loss=final_loss, compiled=args.compile, linear_forward=args.linear_forward)
    del engine, model, batches, output
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def profile_steps(engine, batches, device: torch.device, path: Path, title: str) -> None:
    """Appends to ``path`` the operators that take the most device time over ``batches`` (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for micro in batches:
            _train_step(engine, micro)
        _sync(device)
    averages = prof.key_averages()
    tables = [averages.table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=60)]
    if device.type == "cuda":  # the host-side view above, the device-side view here
        tables.append(averages.table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=60))
    with open(path, "a") as handle:
        handle.write(f"## {title}: {len(batches)} steps\n" + "\n".join(tables) + "\n")


def add_speedups(rows: list[Row], args) -> None:
    """Measured and FLOPs-predicted speedup of each row over the first mlm row of its preset and precision."""
    from pipeline.training.flops import speedup

    for row in rows:
        baseline = next((r for r in rows if r.architecture == "mlm" and r.preset == row.preset
                         and r.precision == row.precision), None)
        if baseline is None:
            continue
        row.measured_speedup = baseline.ms_per_step / row.ms_per_step
        mask_fraction = MaskingConfig(strategy=args.strategy).fractions[0]
        cfg = lambda arch: ModelConfig.preset(row.preset, arch, **({"vocab_size": args.vocab_size}
                                                                   if args.vocab_size else {}))
        row.predicted_speedup = speedup(cfg(row.architecture), row.masking_rate, cfg("mlm"),
                                        baseline.masking_rate, row.seq_len, mask_fraction)


def format_table(rows: list[Row], peak: dict[str, float]) -> str:
    header = ("| preset | arch | rate | precision | batch x len (enc) | ms/step | samples/s | TFLOP/s | MFU "
              "| loader ms/batch | measured speedup | FLOPs-predicted speedup |")
    lines = [header, "|" + "---|" * 12]
    for r in rows:
        speed = lambda v: "-" if v is None else f"{v:.2f}x"
        how = r.precision + (" compiled" if r.compiled else "")
        how += " megatron-fwd" if r.linear_forward == "megatron" else ""
        lines.append(f"| {r.preset} | {r.architecture} | {r.masking_rate:.2f} | {how} "
                     f"| {r.batch} x {r.seq_len} ({r.encoder_len}) | {r.ms_per_step:.1f} | {r.samples_per_s:.1f} "
                     f"| {r.tflops:.2f} | {100 * r.mfu:.1f}% | {r.loader_ms_per_batch:.1f} "
                     f"| {speed(r.measured_speedup)} | {speed(r.predicted_speedup)} |")
    lines.append("matmul peak measured in this run: " + ", ".join(f"{k} {v:.1f} TFLOP/s" for k, v in peak.items()))
    return "\n".join(lines)


def parse_runs(text: str) -> list[tuple[str, float]]:
    runs = []
    for item in text.split(","):
        arch, _, rate = item.partition(":")
        if arch not in ("mlm", "3ml-self", "3ml-cross") or not rate:
            raise SystemExit(f"error: --runs item {item!r}: expected ARCH:RATE with ARCH mlm|3ml-self|3ml-cross")
        runs.append((arch, float(rate)))
    return runs


def main(argv: list[str] | None = None) -> int:
    on_gpu = torch.cuda.is_available()
    parser = argparse.ArgumentParser(prog="python -m bench.throughput", description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", default="large,base" if on_gpu else "tiny")
    parser.add_argument("--runs", default=DEFAULT_RUNS, help="ARCH:RATE,... (the first mlm is the baseline)")
    parser.add_argument("--precisions", default="bf16,fp16" if on_gpu else "fp32")
    parser.add_argument("--seq-len", type=int, default=None, help="default: 128 for large, 512 for base, 64 else")
    parser.add_argument("--batch", type=int, default=None, help="micro batch = global batch (one device)")
    parser.add_argument("--vocab-size", type=int, default=50265, help="RoBERTa's |V| (paper)")
    parser.add_argument("--strategy", default="80-10-10")
    parser.add_argument("--pad-multiple", type=int, default=MaskingConfig.pad_multiple,
                        help="3ML encoder length padded up to a multiple of this (pipeline.data.masking)")
    parser.add_argument("--zero", default="zero2", help="ds_configs/{zero}_{precision}.json")
    parser.add_argument("--ds-config-dir", default=str(Path(__file__).resolve().parent.parent / "ds_configs"))
    parser.add_argument("--steps", type=int, default=20 if on_gpu else 3)
    parser.add_argument("--warmup", type=int, default=5 if on_gpu else 1)
    parser.add_argument("--loader-workers", type=int, default=2)
    parser.add_argument("--loader-batches", type=int, default=20 if on_gpu else 4)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--no-dropout", action="store_true", help="dropout off (isolates the layer cost)")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the Transformer and prediction layers (as run_pretrain.py --compile); "
                             "the compilation happens in the warm-up steps")
    parser.add_argument("--linear-forward", choices=("auto", "megatron"), default="auto",
                        help="model.layers.LINEAR_FORWARD: auto = F.linear at TP=1, megatron = megatron-core's "
                             "forward (its custom autograd function)")
    parser.add_argument("--profile", help="append a torch.profiler table of 3 more steps per row to this file")
    parser.add_argument("--fwd-bwd-factor", type=float, default=MFU_FWD_BWD_FACTOR)
    parser.add_argument("--peak-size", type=int, default=8192 if on_gpu else 512)
    parser.add_argument("--json", help="write the rows and environment here")
    args = parser.parse_args(argv)

    from model.parallel import initialize_model_parallel
    from pipeline.training.distributed import init_distributed

    init_distributed()
    if torch.distributed.get_world_size() != 1:
        raise SystemExit("error: bench.throughput measures one device; run it as a single process")
    initialize_model_parallel(1, args.seed)
    device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")

    import model.layers

    model.layers.LINEAR_FORWARD = args.linear_forward
    precisions = args.precisions.split(",")
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16,
              "bf16_autocast": torch.bfloat16}
    for p in precisions:
        if p not in dtypes:
            raise SystemExit(f"error: --precisions item {p!r}: expected one of {', '.join(dtypes)} "
                             f"(ds_configs/{args.zero}_PRECISION.json)")
    by_dtype = {dtypes[p]: None for p in precisions}  # bf16 and bf16_autocast share one measurement
    for dtype in by_dtype:
        by_dtype[dtype] = measure_matmul_peak(device, dtype, args.peak_size, 50 if on_gpu else 5)
    peak = {p: by_dtype[dtypes[p]] for p in precisions}

    rows: list[Row] = []
    for preset in args.presets.split(","):
        seq_len, batch = GPU_SHAPES.get(preset, (64, 8)) if on_gpu else (64, 8)
        seq_len, batch = args.seq_len or seq_len, args.batch or batch
        for precision in precisions:
            for arch, rate in parse_runs(args.runs):
                rows.append(run_one(preset, arch, rate, precision, seq_len, batch, args, device, peak[precision]))
                print(f"{preset} {arch} r={rate} {precision}: {rows[-1].ms_per_step:.1f} ms/step", flush=True)
    add_speedups(rows, args)

    print(format_table(rows, peak))
    if args.json:
        env = {"device": torch.cuda.get_device_name() if on_gpu else "cpu", "torch": torch.__version__,
               "date": time.strftime("%Y-%m-%d"), "peak_tflops": peak, "fwd_bwd_factor": args.fwd_bwd_factor}
        write_json_atomic(args.json, {"environment": env, "rows": [asdict(r) for r in rows]})
    return 0


if __name__ == "__main__":
    sys.exit(main())
