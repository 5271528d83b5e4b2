"""Host work per optimizer step: MLM vs 3ML under DeepSpeed ZeRO-2 and the hook-free ZeRO-0 path, measured
side by side in one run, at the large preset's depth with tiny widths so that the step is nearly all host work.

A GPU step is host-bound when Python issues work slower than the GPU runs it (README, Performance on the GPU:
the 3ML steps are). On a CPU with a tiny-width model the compute is negligible, so what is measured here is
what the host does per optimizer step -- the part a GPU run cannot hide:

* ``wall ms``: median and minimum wall time of one optimizer step (``accumulation`` micro batches: forward,
  backward, ``engine.step()``), rank 0. The ratios use the minimum: the host work of a step is fixed, and on a
  shared machine other processes can only add to it;
* ``hooks``: Python gradient hooks that fired in one optimizer step (every hook registered on a parameter --
  DeepSpeed ZeRO-1/2's ``register_post_accumulate_grad_hook`` per parameter -- is wrapped with a counter);
* ``ATen ops``: operators dispatched in one optimizer step (a ``TorchDispatchMode`` counter: forward, backward,
  gradient reduction, optimizer); ``fwd ops``, those of the forwards alone, and ``dec-layer fwd ops``, those
  inside the 3ML decoder's Transformer layers (what 3ML adds to MLM's layer stack by construction);
* ``host ops``: operations the host issues in one optimizer step, counted with ``torch.profiler`` (CPU
  activity) in a separate step, and defined the same for eager and compiled code (``host_operations``): every
  dispatcher operator call (``aten::``, ``c10d::``, ...) that no other operator called -- from Python, from the
  autograd engine's backward nodes, from a hook, or from a compiled graph's wrapper (inductor's extern kernels:
  ``aten::mm``, ``aten::addmm``) -- plus every inductor-generated kernel call (``cpp_*`` on CPU, ``triton_*`` on
  a GPU) plus one per compiled-graph call. A GPU step issues one launch or more for each of these. The ops an
  operator runs inside itself (``aten::linear`` -> ``aten::t``, ``aten::addmm``) are that operator's
  work, not counted again; so eager rows count fewer host ops than ATen ops (the dispatch mode sees the
  decomposed ops). Inductor's CPU kernels show up in the profiler only when compiled with
  ``TORCHINDUCTOR_CPP_ENABLE_KERNEL_PROFILE=1``, which the bench sets for its ranks (a record-function handle
  per kernel call: ~0.1 us when no profiler runs). Not counted: Python work that calls no operator (dynamo's
  guard checks, inductor's ``empty_strided_cpu`` allocations, DeepSpeed's bookkeeping) -- the wall time has it;
  ``graph calls``: compiled-graph calls among them (forward and backward graphs);
* ``host syncs``: reads of a device value by the host in one optimizer step (``aten._local_scalar_dense``:
  ``.item()``, ``bool(tensor)``): on a GPU each one waits for the queued work, leaving the GPU idle after;
* ``params``: parameter tensors (the per-parameter work scales with it).
* ``--stages`` (eager rows): one more profiled step's time by stage of the model -- embeddings, encoder,
  decoder, head, 3ML's glue, gradient accumulation, DeepSpeed's backward and step (``bench.stages``) -- GPU
  kernel time on a GPU, CPU time on a CPU, with each stage's achieved TFLOP/s of its model FLOPs.

Every configuration runs in the same processes and their timed steps are interleaved (round-robin blocks), so
the ratios compare like with like on a busy machine. ``--ranks 1,2`` runs the whole set once per world size
(data parallel, ``torch.distributed`` over gloo on CPU, each rank a process started the way ``srun`` would).

CPU (the README table)::

    python -m bench.host_overhead --ranks 1,2 --steps 3 --rounds 5 --json host_overhead.json \
        --paths zero2_fp32,zero0_fp32,zero2_bf16_autocast,zero0_bf16_autocast,zero2_bf16,zero0_bf16

GPU (``bash bench/gpu.sh hostlight``): the same with ``--preset large|base``, the paper's batch shapes and
``--compile layers``; it adds GPU-busy ms (profiler), MFU and the measured/predicted speedups. ``--compile``
takes ``run_pretrain.py``'s modes (the engine is built by the same ``build_engine``): ``layers``, or ``model``,
the whole forward (DeepSpeed's ``engine.compile()``); a ``*_deepcompile`` path runs DeepCompile (CUDA only).
Compiled rows count hooks and host ops, not ATen ops (compiled code runs past a dispatch-mode counter).

Compile modes on CPU (the README table)::

    python -m bench.host_overhead --paths zero2_fp32,zero0_fp32 --compile none,layers,model --ranks 1 \
        --steps 3 --rounds 5 --warmup 2 --json host_overhead_compile_modes.json

CI (small depth, counts asserted in tests/test_host_overhead.py)::

    python -m bench.host_overhead --encoder-layers 2 --decoder-layers 1 --steps 1 --rounds 1 --warmup 1 \
        --ranks 1 --paths zero2_fp32,zero0_fp32
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from bench import stages
from bench.throughput import parse_runs
from model.config import ModelConfig
from pipeline.data.batch import SpecialTokens
from pipeline.data.masking import Masker, MaskingCollator, MaskingConfig
from pipeline.io import write_json_atomic

REPO = Path(__file__).resolve().parent.parent
SPECIAL = SpecialTokens(bos=0, pad=1, eos=2, unk=3, mask=4)  # RoBERTa's special ids; no tokenizer needed
DEFAULT_RUNS = "mlm:0.15,3ml-self:0.5,3ml-cross:0.5"
# A path is a ds_configs/ file, ZEROSTAGE_PRECISION.json, named without ".json": zero2_* is today's layout
# (the ratios' baseline, same precision), zero0_* the hook-free one. DeepSpeed's CPU accelerator has no fp16;
# its bf16 mode runs the same mixed-precision wrappers (ZeRO-2's optimizer, ZeRO-0's flat FP16_Optimizer).
DEFAULT_PATHS = "zero2_fp32,zero0_fp32,zero2_bf16,zero0_bf16"


def precision(path: str) -> str:
    """``zero2_bf16_autocast_deepcompile`` -> ``bf16_autocast``: the baseline of a DeepCompile row is plain ZeRO-2."""
    return path.split("_", 1)[1].removesuffix("_deepcompile")


@dataclass
class Row:
    ranks: int
    path: str
    architecture: str
    masking_rate: float
    compile: str
    params: int
    wall_ms: float
    min_ms: float
    hooks: int
    aten_ops: int | None
    forward_ops: int | None
    decoder_layer_forward_ops: int | None
    host_syncs: int | None
    top_ops: list = field(default_factory=list)
    preset: str = "large-depth-tiny-width"
    batch: int = 0
    seq_len: int = 0
    accumulation: int = 1
    gpu_busy_ms: float | None = None
    mfu: float | None = None
    predicted_speedup: float | None = None
    measured_speedup: float | None = None
    wall_ratio_vs_zero2: float | None = None
    ops_ratio_vs_mlm: float | None = None
    wall_ratio_vs_mlm: float | None = None
    host_ops: int | None = None
    graph_calls: int | None = None
    host_ops_ratio_vs_mlm: float | None = None
    top_host_ops: list = field(default_factory=list)
    # --stages: bench.stages.attribute of one step, {stage: {"forward": ms, "backward": ms}}, and each stage's
    # model FLOPs per optimizer step on this rank (forward + 2x backward)
    stage_ms: dict | None = None
    stage_flops: dict | None = None


class OpCounter(TorchDispatchMode):
    """Counts the ATen operators dispatched while active (``torch.utils._python_dispatch``'s mode: every op
    below autograd passes through ``__torch_dispatch__`` once); ``scoped`` counts those dispatched inside the
    forwards of ``watch``-ed modules."""

    def __init__(self):
        super().__init__()
        self.counts: collections.Counter = collections.Counter()
        self.scoped = 0
        self._depth = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[str(func.overloadpacket)] += 1
        self.scoped += self._depth > 0
        return func(*args, **(kwargs or {}))

    def watch(self, modules) -> list:
        """Forward hooks that mark ``modules``' forwards as the scope; returns their handles."""
        def enter(*_):
            self._depth += 1

        def leave(*_):
            self._depth -= 1
        return [h for m in modules for h in (m.register_forward_pre_hook(enter), m.register_forward_hook(leave))]

    @property
    def total(self) -> int:
        return sum(self.counts.values())


# Profiler event names (torch.profiler, CPU activity): a dispatcher operator is NAMESPACE::name; the autograd
# engine's events (autograd::engine::evaluate_function: X, torch::autograd::AccumulateGrad) look alike but are
# not operators. Inductor's generated kernels: graph_N_cpp_* (CPU, with TORCHINDUCTOR_CPP_ENABLE_KERNEL_PROFILE)
# and triton_* (GPU); a compiled graph's call is torch._inductor.output_code's "## Call CompiledFxGraph KEY ##".
OPERATOR_EVENT = re.compile(r"^(?!autograd::|torch::autograd::)[A-Za-z_]\w*::\w+")
KERNEL_EVENT = re.compile(r"^(graph_\d+_)?cpp_|^triton_")
GRAPH_CALL_PREFIX = "## Call CompiledFxGraph"


def host_operations(events) -> tuple[int, int, collections.Counter]:
    """``(host ops, graph calls, count per name)`` of one profiled stretch (``prof.events()``): operator and
    generated-kernel events with no operator or kernel event above them, plus the compiled-graph calls (see the
    module docstring)."""
    def issues(event) -> bool:
        return bool(OPERATOR_EVENT.match(event.name) or KERNEL_EVENT.match(event.name))

    counts: collections.Counter = collections.Counter()
    graph_calls = 0
    for event in events:
        if event.name.startswith(GRAPH_CALL_PREFIX):
            graph_calls += 1
        elif issues(event):
            parent = event.cpu_parent
            while parent is not None and not issues(parent):
                parent = parent.cpu_parent
            if parent is None:  # issued by Python, the autograd engine or a graph's wrapper, not by an operator
                counts[event.name] += 1
    return sum(counts.values()) + graph_calls, graph_calls, counts


class HookCounter:
    """Wraps every gradient hook registered on the parameters (post-accumulate and tensor hooks) with a
    counter; torch keeps them in these per-tensor dicts, which is where DeepSpeed's ZeRO-1/2 hooks live."""

    def __init__(self, module: torch.nn.Module):
        self.fired = 0
        for param in module.parameters():
            for attr in ("_post_accumulate_grad_hooks", "_backward_hooks"):
                hooks = getattr(param, attr, None)
                if hooks:
                    for key, hook in list(hooks.items()):
                        hooks[key] = self._counted(hook)

    def _counted(self, hook):
        def counted(*args, **kwargs):
            self.fired += 1
            return hook(*args, **kwargs)
        return counted


class SyntheticDataset(torch.utils.data.Dataset):
    """Fixed random ``<s> ... </s>`` sequences masked per sample as the training dataset does."""

    def __init__(self, masker: Masker, seq_len: int, vocab_size: int, size: int, seed: int):
        rng = np.random.default_rng(seed)
        self.tokens = rng.integers(5, vocab_size, size=(size, seq_len), dtype=np.int64)
        self.tokens[:, 0], self.tokens[:, -1] = SPECIAL.bos, SPECIAL.eos
        self.masker = masker

    def __len__(self):
        return len(self.tokens)

    def __getitem__(self, index):
        return self.masker(self.tokens[index], sample_index=index, epoch=0)


def model_config(arch: str, args) -> ModelConfig:
    """``--preset``'s model (GPU), or by default the large preset's structure (depth, pre-LN, tied embeddings:
    its parameter-tensor count) at tiny widths, where a CPU step is nearly all host work."""
    if args.preset:
        max_positions = max(args.seq_len, ModelConfig.preset(args.preset, arch).max_positions)
        return ModelConfig.preset(args.preset, arch, vocab_size=args.vocab_size, max_positions=max_positions)
    return ModelConfig.preset(
        "large", arch, num_layers=args.encoder_layers, decoder_num_layers=args.decoder_layers,
        hidden_size=args.hidden, ffn_size=2 * args.hidden, num_heads=2, decoder_hidden_size=args.hidden // 2,
        decoder_ffn_size=args.hidden, decoder_num_heads=2, vocab_size=args.vocab_size, vocab_pad_multiple=8,
        max_positions=args.seq_len, hidden_dropout=0.1, attention_dropout=0.1)


def training_config(args, world: int):
    from pipeline.training.config import TrainingConfig

    micro = args.micro_batch
    return TrainingConfig(seq_len=args.seq_len, global_batch_size=micro * args.accumulation * world,
                          micro_batch_size=micro, train_steps=10 ** 6, lr=1e-4, seed=args.seed)


def ds_config_for(path: str, training, world: int) -> dict:
    from deepspeed.accelerator import get_accelerator

    from pipeline.training.config import build_deepspeed_config

    accelerator = get_accelerator()
    file = REPO / "ds_configs" / f"{path}.json"
    ds = build_deepspeed_config(file, training, world, accelerator.device_name(), accelerator.is_fp16_supported(),
                                accelerator.is_bf16_supported())
    asks_fused_adam = not json.loads(file.read_text()).get("optimizer", {}).get("params", {}).get("torch_adam")
    if accelerator.device_name() == "cpu" and asks_fused_adam:
        # DeepSpeed's FusedAdam is GPU-only and the CPU falls back to torch's AdamW; its default for-loop form
        # reads every parameter's step counter on the host. torch's fused AdamW (one operator per group) is what
        # stands in for FusedAdam here, so a CPU row counts the host work a GPU step has.
        ds["optimizer"]["params"]["fused"] = True
    return ds


class Config:
    """One (path, architecture, rate, compile) engine with its batches, ready to step."""

    def __init__(self, path: str, arch: str, rate: float, compile_mode: str, args, world: int, rank: int,
                 device: torch.device):
        from model import build_model
        from pipeline.training.engine import build_engine
        from pipeline.training.flops import MFU_FWD_BWD_FACTOR, forward_flops_by_stage

        if path.endswith("_deepcompile"):
            compile_mode = "deepcompile"  # DeepSpeed's engine.compile() compiles the whole model itself
        self.path, self.arch, self.rate, self.compile_mode = path, arch, rate, compile_mode
        self.accumulation = args.accumulation
        self.device = device
        self.model_config = config = model_config(arch, args)
        masking = MaskingConfig(rate=rate, seed=args.seed)
        self.mask_fraction = masking.fractions[0]
        # Model FLOPs of one optimizer step on this rank (forward + 2x backward, Appendix D), by stage (the
        # --stages table's rates) and in all (the MFU).
        self.stage_flops = {name: MFU_FWD_BWD_FACTOR * args.micro_batch * args.accumulation * flops
                            for name, flops in forward_flops_by_stage(config, args.seq_len, rate,
                                                                      self.mask_fraction).items()}
        self.flops = sum(self.stage_flops.values())
        self.seq_len = args.seq_len
        collator = MaskingCollator(masking, SPECIAL.pad)
        micro = args.micro_batch
        dataset = SyntheticDataset(Masker(masking, SPECIAL, config.vocab_size), args.seq_len, config.vocab_size,
                                   size=micro * args.accumulation * world, seed=args.seed)
        # This rank's micro batches of one optimizer step (the same every step: the content does not change
        # the host work).
        self.micros = [{k: v.to(device) for k, v in
                        collator([dataset[(i * world + rank) * micro + j] for j in range(micro)]).items()}
                       for i in range(args.accumulation)]
        model = build_model(config, init_seed=args.seed).to(device)
        self.params = sum(1 for p in model.parameters() if p.requires_grad)
        training = training_config(args, world)
        # The engine run_pretrain.py trains (pipeline.training.engine's one builder).
        self.engine = build_engine(model, training, ds_config_for(path, training, world),
                                   compile="none" if compile_mode == "deepcompile" else compile_mode)
        self.hooks = HookCounter(self.engine.module)
        self.times: list[float] = []
        self.last_loss = None

    def optimizer_step(self, forward_counter: OpCounter | None = None, phases: bool = False):
        """One optimizer step; ``phases``: its forward, backward and step inside ``bench.stages``' ranges."""
        phase = stages.phase if phases else (lambda _name: contextlib.nullcontext())
        for micro in self.micros:
            with phase("forward"), (contextlib.nullcontext() if forward_counter is None else forward_counter):
                output = self.engine(micro)
            with phase("backward"):
                self.engine.backward(output.loss)
            with phase("step"):
                self.engine.step()
        self.last_loss = output.loss

    def stage_profile(self) -> dict | None:
        """``bench.stages.attribute`` of one profiled optimizer step: GPU kernel time (CPU time on a CPU) by
        stage, in ms; eager only (None otherwise: a compiled module runs its hooks inside its graph, where the
        profiler ranges vanish, and hooks added after compilation would recompile it)."""
        if self.compile_mode != "none":
            return None
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
        self._sync()
        with stages.stage_ranges(self.engine.module), profile(activities=activities) as prof:
            self.optimizer_step(phases=True)
            self._sync()
        return {name: {k: v / 1000.0 for k, v in split.items()}
                for name, split in stages.attribute(prof.events()).items()}

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def timed_steps(self, count: int):
        for _ in range(count):
            self._sync()
            start = time.perf_counter()
            self.optimizer_step()
            self._sync()
            self.times.append(time.perf_counter() - start)

    def gpu_busy_ms(self, steps: int = 2) -> float | None:
        """Device time of the kernels of one optimizer step (torch.profiler, CUDA activity), averaged."""
        if self.device.type != "cuda":
            return None
        from torch.profiler import ProfilerActivity, profile

        self._sync()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                self.optimizer_step()
            self._sync()
        return kernel_time_us(prof.key_averages()) / 1000.0 / steps

    def host_ops_step(self, top: int) -> dict:
        """Host ops of one optimizer step (``host_operations``) from a torch.profiler trace, CPU activity only."""
        from torch.profiler import ProfilerActivity, profile

        self._sync()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            self.optimizer_step()
            self._sync()
        host_ops, graph_calls, counts = host_operations(prof.events())
        return {"host_ops": host_ops, "graph_calls": graph_calls, "top_host_ops": counts.most_common(top)}

    def counted_step(self, top: int) -> dict:
        fired_before = self.hooks.fired
        forward = OpCounter()
        decoder = getattr(self.engine.module, "decoder", None)
        handles = forward.watch(decoder.layers if decoder is not None else [])
        if self.compile_mode == "none":
            with OpCounter() as total:
                self.optimizer_step(forward_counter=forward)
            ops, fwd_ops, decoder_ops = total.total, forward.total, forward.scoped
            syncs = total.counts["aten._local_scalar_dense"]
            top_ops = total.counts.most_common(top)
        else:  # compiled code under a dispatch mode would run another way: count hooks only
            self.optimizer_step()
            ops = fwd_ops = decoder_ops = syncs = None
            top_ops = []
        for handle in handles:
            handle.remove()
        counts = {"hooks": self.hooks.fired - fired_before, "aten_ops": ops, "forward_ops": fwd_ops,
                  "decoder_layer_forward_ops": decoder_ops, "host_syncs": syncs, "top_ops": top_ops}
        return counts | self.host_ops_step(top)  # its own step: a dispatch mode would add events to the trace


def kernel_time_us(events) -> float:
    """Device time of the kernels among profiler events (``key_averages()`` or ``events()``), in us.

    Only the device-side events count: a CPU operator's ``self_device_time_total`` is the time of the kernels it
    launched, which are events of their own too, so summing over every event counts each kernel twice (the
    first GPU run of bench/gpu.sh hostlight_eager, 2026-12-04, printed GPU-busy ms ~2x the step time)."""
    from torch.autograd import DeviceType

    return float(sum(e.self_device_time_total for e in events if e.device_type != DeviceType.CPU))


_START = time.perf_counter()


def progress(message: str) -> None:
    """A line in the rank's log with the seconds since start: where a run that times out spent its time."""
    print(f"[{time.perf_counter() - _START:7.1f}s] {message}", flush=True)


def worker(args) -> int:
    """One rank: builds every configuration, interleaves their timed steps, rank 0 writes the rows."""
    import torch.distributed as dist

    from model.parallel import initialize_model_parallel
    from pipeline.training.distributed import init_distributed

    init_distributed()
    world, rank = dist.get_world_size(), dist.get_rank()
    initialize_model_parallel(1, args.seed)
    torch.manual_seed(args.seed)
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    peak = {}
    if device.type == "cuda":  # the matmul peak MFU is measured against, in this run
        from bench.throughput import measure_matmul_peak

        for name, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
            peak[name] = measure_matmul_peak(device, dtype, 8192, 50)
    progress("initialised")
    configs = [Config(path, arch, rate, mode, args, world, rank, device)
               for mode in args.compile.split(",") for path in args.paths.split(",")
               for arch, rate in parse_runs(args.runs)]
    progress(f"built {len(configs)} engines")
    counts = []
    for config in configs:
        config.timed_steps(args.warmup)  # compilation, DeepSpeed's lazy buffers, allocator warm-up
        config.times.clear()  # the warm-up steps (compilation: seconds to minutes) are not in the median
        counts.append(config.counted_step(args.top_ops))
        counts[-1]["gpu_busy_ms"] = config.gpu_busy_ms()
        counts[-1]["stage_ms"] = config.stage_profile() if args.stages else None
        progress(f"{config.path} {config.compile_mode} {config.arch}: warmed up and counted")
    for _ in range(args.rounds):  # interleaved: every configuration sees the same machine load
        for config in configs:
            dist.barrier()
            config.timed_steps(args.steps)
    rows = []
    for config, count in zip(configs, counts):
        median_s = statistics.median(config.times)
        peak_tflops = peak.get("fp16" if "fp16" in config.path else "bf16")
        rows.append(Row(world, config.path, config.arch, config.rate, config.compile_mode, config.params,
                        1000.0 * median_s, 1000.0 * min(config.times), count["hooks"], count["aten_ops"],
                        count["forward_ops"], count["decoder_layer_forward_ops"], count["host_syncs"],
                        count["top_ops"],
                        preset=args.preset or "large-depth-tiny-width", batch=args.micro_batch,
                        seq_len=args.seq_len, accumulation=args.accumulation, gpu_busy_ms=count["gpu_busy_ms"],
                        mfu=config.flops / median_s / 1e12 / peak_tflops if peak_tflops else None,
                        predicted_speedup=_predicted_speedup(config, configs), host_ops=count["host_ops"],
                        graph_calls=count["graph_calls"], top_host_ops=count["top_host_ops"],
                        stage_ms=count["stage_ms"], stage_flops=config.stage_flops if args.stages else None))
        assert torch.isfinite(config.last_loss), f"{config.path} {config.arch}: loss {config.last_loss}"
    if rank == 0:
        Path(args.worker_output).write_text(json.dumps([asdict(r) for r in rows]))
    dist.barrier()
    return 0


def _predicted_speedup(config: Config, configs: list[Config]) -> float | None:
    """The FLOPs-predicted speedup of ``config`` over the MLM row of its path (pipeline.training.flops)."""
    from pipeline.training.flops import speedup

    mlm = next((c for c in configs if c.arch == "mlm" and (c.path, c.compile_mode) == (config.path,
                                                                                      config.compile_mode)), None)
    if mlm is None:
        return None
    return speedup(config.model_config, config.rate, mlm.model_config, mlm.rate, config.seq_len,
                   config.mask_fraction)


def launch(world: int, argv: list[str], timeout: float) -> list[Row]:
    """Runs ``world`` worker processes (env:// rendezvous, as srun starts ranks) and reads rank 0's rows."""
    from pipeline.training.distributed import free_port

    with tempfile.TemporaryDirectory() as tmp:
        output = Path(tmp) / "rows.json"
        env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE=str(world),
                   PYTHONPATH=os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p))
        if not torch.cuda.is_available():
            env.setdefault("DS_ACCELERATOR", "cpu")
        env.setdefault("OMP_NUM_THREADS", "1")
        env.setdefault("TORCHINDUCTOR_CPP_ENABLE_KERNEL_PROFILE", "1")  # inductor's CPU kernels in the profiler
        logs = [open(Path(tmp) / f"rank{r}.log", "w+") for r in range(world)]
        procs = [subprocess.Popen([sys.executable, "-m", "bench.host_overhead", *argv, "--worker-output",
                                   str(output)], env=dict(env, RANK=str(r), LOCAL_RANK=str(r)), cwd=REPO,
                                  stdout=logs[r], stderr=subprocess.STDOUT) for r in range(world)]

        def rank0_log_tail() -> str:
            logs[0].flush()
            return Path(logs[0].name).read_text(errors="replace")[-4000:]

        def on_sigterm(*_):
            # bench/gpu.sh's timeout: end the ranks too, and say how far rank 0 got (its progress lines).
            for p in procs:
                p.kill()
            print(f"error: stopped by SIGTERM; rank 0's log ends:\n{rank0_log_tail()}", flush=True)
            sys.exit(124)

        previous = signal.signal(signal.SIGTERM, on_sigterm)
        try:
            codes = [p.wait(timeout) for p in procs]
        except subprocess.TimeoutExpired:
            codes = [-9] * world
        finally:
            signal.signal(signal.SIGTERM, previous)
            for p in procs:
                if p.poll() is None:
                    p.kill()
        if any(codes) or not output.exists():
            raise SystemExit(f"error: {world}-rank run failed (exit codes {codes}); rank 0's log ends:\n"
                             + rank0_log_tail())
        return [Row(**r) for r in json.loads(output.read_text())]


def add_ratios(rows: list[Row]) -> None:
    """Ratios measured in the same run: each path's wall time against ZeRO-2's (same ranks, arch, compile);
    each architecture's ops and wall time against MLM's (same ranks, path, compile)."""
    for row in rows:
        same = [r for r in rows if (r.ranks, r.compile) == (row.ranks, row.compile)]
        zero2 = next((r for r in rows if (r.ranks, r.path, r.architecture, r.masking_rate)
                      == (row.ranks, "zero2_" + precision(row.path), row.architecture, row.masking_rate)
                      and (r.compile == row.compile or row.compile == "deepcompile")), None)
        mlm = next((r for r in same if r.path == row.path and r.architecture == "mlm"), None)
        if zero2 is not None:
            row.wall_ratio_vs_zero2 = row.min_ms / zero2.min_ms
        if mlm is not None:
            row.wall_ratio_vs_mlm = row.min_ms / mlm.min_ms
            row.measured_speedup = mlm.wall_ms / row.wall_ms
            if row.aten_ops is not None and mlm.aten_ops:
                row.ops_ratio_vs_mlm = row.aten_ops / mlm.aten_ops
            if row.host_ops is not None and mlm.host_ops:
                row.host_ops_ratio_vs_mlm = row.host_ops / mlm.host_ops


def format_table(rows: list[Row]) -> str:
    ratio = lambda v: "-" if v is None else f"{v:.2f}x"
    count = lambda v: "-" if v is None else str(v)
    lines = [("| ranks | path | compile | arch | rate | params | ms/step median | min | min vs ZeRO-2 | min vs MLM "
              "| hooks fired | host syncs | ATen ops | fwd ops | dec-layer fwd ops | ops vs MLM | host ops "
              "| graph calls | host ops vs MLM |"), "|" + "---|" * 19]
    for r in rows:
        lines.append(f"| {r.ranks} | {r.path} | {r.compile} | {r.architecture} | {r.masking_rate:.2f} | {r.params} "
                     f"| {r.wall_ms:.1f} | {r.min_ms:.1f} | {ratio(r.wall_ratio_vs_zero2)} "
                     f"| {ratio(r.wall_ratio_vs_mlm)} "
                     f"| {r.hooks} | {count(r.host_syncs)} | {count(r.aten_ops)} | {count(r.forward_ops)} "
                     f"| {count(r.decoder_layer_forward_ops)} | {ratio(r.ops_ratio_vs_mlm)} | {count(r.host_ops)} "
                     f"| {count(r.graph_calls)} | {ratio(r.host_ops_ratio_vs_mlm)} |")
    if any(r.gpu_busy_ms is not None for r in rows):
        lines += ["", "| preset | batch x len x accumulation | path | compile | arch | rate | ms/step | GPU-busy ms "
                  "| MFU | measured speedup | FLOPs-predicted |", "|" + "---|" * 11]
        for r in rows:
            busy = "-" if r.gpu_busy_ms is None else f"{r.gpu_busy_ms:.1f}"
            mfu = "-" if r.mfu is None else f"{100 * r.mfu:.1f}%"
            lines.append(f"| {r.preset} | {r.batch} x {r.seq_len} x {r.accumulation} | {r.path} | {r.compile} "
                         f"| {r.architecture} | {r.masking_rate:.2f} | {r.wall_ms:.1f} | {busy} | {mfu} "
                         f"| {ratio(r.measured_speedup)} | {ratio(r.predicted_speedup)} |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.host_overhead", description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", default=DEFAULT_RUNS, help="ARCH:RATE,... (mlm is the baseline)")
    parser.add_argument("--paths", default=DEFAULT_PATHS,
                        help="comma-separated ds_configs/ names without .json (zero2_PRECISION is the baseline "
                             "of the rows of its precision)")
    parser.add_argument("--compile", default="none",
                        help="comma-separated from none, layers (model.layers.compile_layers), model "
                             "(engine.compile(): the whole forward)")
    parser.add_argument("--ranks", default="1,2", help="world sizes to run, e.g. 1,2")
    parser.add_argument("--preset", choices=ModelConfig.preset_names(),
                        help="this preset's model at --vocab-size (GPU runs) instead of tiny widths at the large "
                             "preset's depth (--encoder-layers, --decoder-layers, --hidden)")
    parser.add_argument("--encoder-layers", type=int, default=24, help="the large preset's depth")
    parser.add_argument("--decoder-layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=32, help="encoder width (tiny: compute is negligible)")
    parser.add_argument("--vocab-size", type=int, default=512)
    parser.add_argument("--seq-len", type=int, default=32)
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--accumulation", type=int, default=2, help="micro batches per optimizer step")
    parser.add_argument("--steps", type=int, default=5, help="timed optimizer steps per round")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds over the configurations")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--top-ops", type=int, default=0,
                        help="also list the N most frequent ATen ops and host ops per row")
    parser.add_argument("--stages", action="store_true",
                        help="also time one step by stage of the model (bench.stages; --compile none rows)")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per world size")
    parser.add_argument("--json", help="write the rows here")
    parser.add_argument("--worker-output", help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    for path in args.paths.split(","):
        if "_" not in path or not (REPO / "ds_configs" / f"{path}.json").is_file():
            parser.error(f"--paths item {path!r}: expected the name of a ds_configs/ZERO_PRECISION.json file")
    for mode in args.compile.split(","):
        if mode not in ("none", "layers", "model"):
            parser.error(f"--compile item {mode!r}: expected none, layers or model")
    parse_runs(args.runs)
    if args.worker_output:
        return worker(args)
    rows = []
    for world in (int(w) for w in args.ranks.split(",")):
        rows += launch(world, argv, args.timeout)
    add_ratios(rows)
    print(format_table(rows))
    staged = [r for r in rows if r.stage_ms]
    if staged:
        unit = "GPU kernel" if any(r.gpu_busy_ms is not None for r in staged) else "CPU"
        print(f"\n{unit} ms per optimizer step by stage, forward + backward (TFLOP/s of its model FLOPs):")
        print(stages.format_stage_table(
            [stages.StageRow(f"{r.ranks} {r.path} {r.compile} {r.architecture} {r.masking_rate:.2f}",
                             {name: sum(split.values()) for name, split in r.stage_ms.items()},
                             r.stage_flops or {}) for r in staged]))
    if args.top_ops:
        for r in rows:
            print(f"{r.ranks} rank(s) {r.path} {r.compile} {r.architecture}: ATen ops "
                  + ", ".join(f"{name} {n}" for name, n in r.top_ops) + "; host ops "
                  + ", ".join(f"{name} {n}" for name, n in r.top_host_ops))
    if args.json:
        # The load average tells how shared the machine was (wall times on a busy CPU are mostly scheduling).
        environment = {"torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "argv": argv,
                       "cpus": os.cpu_count(), "load_average_1_5_15min_at_end": list(os.getloadavg())}
        write_json_atomic(args.json, {"environment": environment, "rows": [asdict(r) for r in rows]})
    return 0


if __name__ == "__main__":
    sys.exit(main())
