"""Where an optimizer step's time goes, by stage of the model: the 3ML step's kernels took 1.23x less GPU time
than MLM's on large and 1.04x on base (H200, 2026-12-04, eager ZeRO-0), against the 1.46x / 1.28x their FLOPs
predict; this says which stage keeps the difference.

Stages (``stage_modules``): ``embeddings``; ``encoder`` (its layers and final LayerNorm); ``decoder`` (3ML's
projection to the decoder width, position embeddings, LayerNorm, layers); ``head`` (prediction transforms and
the output layer with its loss). Outside them: ``glue`` (forward operators outside the stages -- 3ML's
gather/scatter, the [MASK] embeddings, masks, the loss reduction -- and their backward), ``grad accumulation``
(autograd's ``AccumulateGrad``, where ZeRO-1/2's per-parameter hooks run), ``engine.backward`` (what
DeepSpeed's ``backward()`` does outside the autograd nodes: loss scaling, ZeRO-0's all-reduce at the
accumulation boundary) and ``engine.step`` (the optimizer update); ``other`` is what is under none of these.

How (eager steps: a compiled module runs its forward hooks inside its graph, where a profiler range vanishes):
while one step is profiled, each stage module's forward runs inside a ``record_function`` range (forward pre/post hooks,
removed afterwards), and the step's forward, backward and ``engine.step()`` inside phase ranges. A backward node
is attributed to the stage of the forward operator that created it: the profiler records the autograd sequence
number on both (``FunctionEvent.sequence_nr``). Each event's own cost goes to its nearest enclosing stage, backward
node or phase: on a GPU the kernels it launched (``FunctionEvent.kernels``), on a CPU its self CPU time. The GPU
kernels no CPU event claims are reported as ``unattributed`` (0 when the profiler correlated every launch).
"""

from __future__ import annotations

import collections
import contextlib
from typing import NamedTuple

import torch
from torch.autograd import DeviceType
from torch.profiler import record_function

STAGE_RANGE = "stage::"
PHASE_RANGE = "phase::"
BACKWARD_NODE = "autograd::engine::evaluate_function: "
ACCUMULATE_GRAD = BACKWARD_NODE + "torch::autograd::AccumulateGrad"
STAGES = ("embeddings", "encoder", "decoder", "head")
OUTSIDE = ("glue", "grad accumulation", "engine.backward", "engine.step", "other")
# A phase range's events that belong to no stage and no backward node (see the module docstring).
PHASE_STAGE = {"forward": "glue", "backward": "engine.backward", "step": "engine.step"}


def stage_modules(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """``(stage, module)`` for every module whose forward is timed as part of a stage (``model.architectures``'
    ``PretrainingModel``; the decoder's ``run_layers``/``embed`` are methods, so its parts are listed)."""
    encoder, decoder = model.encoder, getattr(model, "decoder", None)
    found = [("embeddings", encoder.embeddings)]
    found += [("encoder", layer) for layer in encoder.layers]
    if encoder.final_layernorm is not None:
        found.append(("encoder", encoder.final_layernorm))
    if decoder is not None:
        found += [("decoder", model.decoder_projection), ("decoder", decoder.position_embeddings),
                  ("decoder", decoder.embedding_layernorm)]
        found += [("decoder", layer) for layer in decoder.layers]
        if decoder.final_layernorm is not None:
            found.append(("decoder", decoder.final_layernorm))
        found.append(("head", decoder.head_transform))
    if model.head_transform is not None:
        found.append(("head", model.head_transform))
    found.append(("head", model.output_layer))
    return found


@contextlib.contextmanager
def stage_ranges(model: torch.nn.Module):
    """While active, each stage module's forward runs inside a ``stage::NAME`` profiler range."""
    open_ranges: dict[int, list] = collections.defaultdict(list)

    def enter(name):
        def hook(module, _args):
            ctx = record_function(STAGE_RANGE + name)
            ctx.__enter__()
            open_ranges[id(module)].append(ctx)
        return hook

    def leave(module, _args, _output):
        open_ranges[id(module)].pop().__exit__(None, None, None)

    handles = []
    for name, module in stage_modules(model):
        handles.append(module.register_forward_pre_hook(enter(name)))
        handles.append(module.register_forward_hook(leave))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def phase(name: str):
    """The ``phase::NAME`` range (``forward``, ``backward``, ``step``) of a profiled optimizer step."""
    return record_function(PHASE_RANGE + name)


def attribute(events, cost=None) -> dict[str, dict[str, float]]:
    """``{stage: {"forward": us, "backward": us}}`` of a profiled stretch (``prof.events()``), plus the
    ``OUTSIDE`` groups (their time under ``"forward"`` or ``"backward"`` by where it ran) and, on a GPU,
    ``unattributed`` kernels. GPU kernel time if the trace has any, self CPU time otherwise; ``cost(event)``
    replaces either (the tests count operators with it)."""
    on_device = cost is None and any(e.device_type != DeviceType.CPU for e in events)
    if cost is None:
        cost = (lambda e: sum(k.duration for k in e.kernels)) if on_device else (lambda e: e.self_cpu_time_total)
    cpu_events = [e for e in events if e.device_type == DeviceType.CPU]
    # sequence number of every forward operator inside a stage range -> that stage
    stage_of_sequence = {}
    for event in cpu_events:
        if event.sequence_nr >= 0 and not event.name.startswith(BACKWARD_NODE):
            stage = _enclosing(event, STAGE_RANGE)
            if stage is not None:
                # a forward event's own thread is the one its backward nodes name as fwd_thread
                stage_of_sequence.setdefault((event.thread, event.sequence_nr), stage)

    result = {name: {"forward": 0.0, "backward": 0.0} for name in STAGES + OUTSIDE}
    for event in cpu_events:
        amount = cost(event)
        if amount:
            stage, direction = _classify(event, stage_of_sequence)
            result[stage][direction] += amount
    if on_device:
        total = sum(e.self_device_time_total for e in events if e.device_type != DeviceType.CPU)
        claimed = sum(sum(d.values()) for d in result.values())
        result["unattributed"] = {"forward": 0.0, "backward": max(0.0, total - claimed)}
    return result


def _enclosing(event, prefix: str) -> str | None:
    while event is not None:
        if event.name.startswith(prefix):
            return event.name[len(prefix):]
        event = event.cpu_parent
    return None


def _classify(event, stage_of_sequence) -> tuple[str, str]:
    """(stage or outside group, forward/backward) from the event's nearest stage range, backward node or phase."""
    while event is not None:
        name = event.name
        if name.startswith(STAGE_RANGE):
            return name[len(STAGE_RANGE):], "forward"
        if name == ACCUMULATE_GRAD:
            return "grad accumulation", "backward"
        if name.startswith(BACKWARD_NODE):
            return stage_of_sequence.get((event.fwd_thread, event.sequence_nr), "glue"), "backward"
        if name.startswith(PHASE_RANGE):
            which = name[len(PHASE_RANGE):]
            return PHASE_STAGE.get(which, "other"), "backward" if which == "backward" else "forward"
        event = event.cpu_parent
    return "other", "forward"


class StageRow(NamedTuple):
    label: str
    stage_ms: dict[str, float]  # stage -> ms per optimizer step, forward + backward
    stage_flops: dict[str, float]  # stage -> model FLOPs per optimizer step (pipeline.training.flops)


def format_stage_table(rows: list[StageRow]) -> str:
    """Markdown: per row the ms of each stage and, where it has FLOPs, the TFLOP/s it achieved."""
    names = [n for n in STAGES + OUTSIDE + ("unattributed",) if any(n in r.stage_ms for r in rows)]
    lines = ["| run | " + " | ".join(names) + " | sum ms |", "|" + "---|" * (len(names) + 2)]
    for r in rows:
        cells = []
        for name in names:
            ms = r.stage_ms.get(name)
            if ms is None:
                cells.append("-")
                continue
            flops = r.stage_flops.get(name) or 0.0
            rate = f" ({flops / (ms / 1e3) / 1e12:.3g} TF/s)" if flops and ms > 0 else ""
            cells.append(f"{ms:.2f}{rate}")
        lines.append(f"| {r.label} | " + " | ".join(cells) + f" | {sum(r.stage_ms.values()):.1f} |")
    return "\n".join(lines)
