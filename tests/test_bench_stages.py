"""bench/stages.py: a profiled DeepSpeed step's work attributed to the model's stages, backward included.

Counted exactly with matrix multiplications: each linear layer's forward is one ``aten::addmm`` and its
backward two ``aten::mm`` (input and weight gradients), so a stage's backward count is twice its forward count
only when every backward node is linked to the stage of the forward operator that created it (before the
sequence numbers were matched on the forward event's own thread, all of them fell into ``glue``)."""

from __future__ import annotations

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from bench import stages

ENCODER_LAYERS, DECODER_LAYERS, MICRO_BATCHES = 3, 2, 2
MICRO_BATCH_SIZE, SEQ_LEN = 2, 32  # bench.host_overhead's defaults
# Linear layers per Transformer layer: QKV, attention output, two FFN; 3MLcross's decoder adds Q, KV and output.
SELF_LAYER_LINEARS, CROSS_LAYER_LINEARS = 4, 7


def _profiled_step(arch: str):
    from bench.host_overhead import Config, build_parser

    args = build_parser().parse_args(["--encoder-layers", str(ENCODER_LAYERS), "--decoder-layers",
                                      str(DECODER_LAYERS), "--accumulation", str(MICRO_BATCHES),
                                      "--micro-batch", str(MICRO_BATCH_SIZE), "--seq-len", str(SEQ_LEN)])
    config = Config("zero0_fp32", arch, 0.5, "none", args, 1, 0, torch.device("cpu"))
    config.optimizer_step()  # DeepSpeed's lazy buffers
    with stages.stage_ranges(config.engine.module), profile(activities=[ProfilerActivity.CPU]) as prof:
        config.optimizer_step(phases=True)
    return config, prof.events()


def _count(events, name: str) -> dict[tuple[str, str], int]:
    found = stages.attribute(events, cost=lambda e: 1.0 if e.name == name else 0.0)
    return {(stage, way): int(n) for stage, split in found.items() for way, n in split.items() if n}


@pytest.mark.parametrize("arch", ["mlm", "3ml-self", "3ml-cross"])
def test_matmuls_by_stage(single_process_group, monkeypatch, arch):
    monkeypatch.setenv("LOCAL_RANK", "0")
    config, events = _profiled_step(arch)
    linears = {"encoder": ENCODER_LAYERS * SELF_LAYER_LINEARS,
               "decoder": {"mlm": 0, "3ml-self": 1 + DECODER_LAYERS * SELF_LAYER_LINEARS,  # + the projection
                           "3ml-cross": 1 + DECODER_LAYERS * CROSS_LAYER_LINEARS}[arch],
               # transform + output layer; 3MLcross predicts from the encoder and from the decoder
               "head": 4 if arch == "3ml-cross" else 2}
    expected = {}
    for stage, n in linears.items():
        if n:
            expected[stage, "forward"] = MICRO_BATCHES * n
    assert _count(events, "aten::addmm") == expected
    assert _count(events, "aten::mm") == {(stage, "backward"): 2 * n for (stage, _), n in expected.items()}

    # Every event's own CPU time is somewhere, and only once.
    found = stages.attribute(events)
    total = sum(e.self_cpu_time_total for e in events)
    assert sum(sum(split.values()) for split in found.values()) == pytest.approx(total, rel=1e-9)
    assert found["grad accumulation"]["backward"] > 0 and found["engine.step"]["forward"] > 0
    assert found["glue"]["forward"] > 0 and found["embeddings"]["forward"] > 0
    assert (found["decoder"]["forward"] > 0) == (arch != "mlm")
    # The FLOPs the table divides by are the model's, by the same stages.
    from pipeline.training.flops import MFU_FWD_BWD_FACTOR, training_flops

    whole = training_flops(config.model_config, MICRO_BATCHES * MICRO_BATCH_SIZE, SEQ_LEN, 0.5, fwd_bwd_factor=MFU_FWD_BWD_FACTOR)
    assert sum(config.stage_flops.values()) == pytest.approx(whole, rel=1e-12)
    assert (config.stage_flops["decoder"] > 0) == (arch != "mlm")


def test_stage_table_rates():
    row = stages.StageRow("1 zero0 none mlm", {"encoder": 10.0, "head": 2.0, "glue": 1.0},
                          {"encoder": 5e12, "head": 1e12, "decoder": 0.0})
    table = stages.format_stage_table([row]).splitlines()
    assert table[0] == "| run | encoder | head | glue | sum ms |"
    assert table[2] == "| 1 zero0 none mlm | 10.00 (500 TF/s) | 2.00 (500 TF/s) | 1.00 | 13.0 |"
