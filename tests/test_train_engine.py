"""The one engine builder (pipeline.training.engine): training, the re-shard and the throughput benchmark get
the same parameter groups -- the same weight decay for every parameter name -- because they call the same
function, and no other code builds a DeepSpeed engine."""

from __future__ import annotations

import ast
import json
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _calls(path: Path) -> set[str]:
    """Dotted names of every call in a source file (``deepspeed.initialize``, ``build_engine``, ...)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Call):
            parts, func = [], node.func
            while isinstance(func, ast.Attribute):
                parts.append(func.attr)
                func = func.value
            if isinstance(func, ast.Name):
                parts.append(func.id)
            names.add(".".join(reversed(parts)))
    return names


def test_only_the_engine_module_calls_deepspeed_initialize():
    sources = [p for d in ("pipeline", "model", "bench") for p in (ROOT / d).rglob("*.py")] + [ROOT / "run_pretrain.py"]
    callers = sorted(str(p.relative_to(ROOT)) for p in sources if "deepspeed.initialize" in _calls(p))
    assert callers == ["pipeline/training/engine.py"]
    for user in ("pipeline/training/trainer.py", "pipeline/training/universal.py", "bench/throughput.py",
                 "bench/host_overhead.py"):
        assert "build_engine" in _calls(ROOT / user), user
    # --compile model is DeepSpeed's engine.compile(), called by build_engine only: what bench/host_overhead.py
    # measures is what training runs.
    compilers = sorted(str(p.relative_to(ROOT)) for p in sources
                       if any(name.endswith("engine.compile") for name in _calls(p)))
    assert compilers == ["pipeline/training/engine.py"]


@pytest.mark.parametrize("zero", ["zero2", "zero3"])
def test_bench_and_training_engines_decay_the_same_parameters(single_process_group, monkeypatch, zero):
    from bench.throughput import build_bench_engine
    from model import build_model
    from model.config import ModelConfig
    from pipeline.training.config import DS_CONFIG_DIR, TrainingConfig, build_deepspeed_config
    from pipeline.training.engine import build_engine, weight_decay_by_name

    monkeypatch.setenv("LOCAL_RANK", "0")  # what every launcher sets; DeepSpeed asserts it
    config = ModelConfig.preset("tiny", "3ml-self", vocab_size=300)
    training = TrainingConfig(seq_len=32, global_batch_size=2, micro_batch_size=2, weight_decay=0.01)
    ds = build_deepspeed_config(DS_CONFIG_DIR / f"{zero}_fp32.json", training, 1, "cpu", False, True)

    model = build_model(config, init_seed=1)
    shapes = {n: p.ndim for n, p in model.named_parameters()}  # before ZeRO-3 partitions them
    trained = weight_decay_by_name(build_engine(model, training, ds), model)
    bench_model = build_model(config, init_seed=1)
    args = SimpleNamespace(lr=training.lr, seed=1, ds_config_dir=str(DS_CONFIG_DIR), zero=zero, compile=False)
    benched = weight_decay_by_name(build_bench_engine(bench_model, 32, 2, "fp32", args), bench_model)

    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert sorted(trained) == sorted(names) == sorted(benched)
    assert benched == trained
    # matrices decay, biases and LayerNorm gains/shifts do not
    assert {n for n, wd in trained.items() if wd == 0.01} == {n for n, d in shapes.items() if d >= 2}
    assert {n for n, wd in trained.items() if wd == 0.0} == {n for n, d in shapes.items() if d < 2}
    assert any(n.endswith("bias") for n in names) and any(wd == 0.0 for wd in benched.values())


def test_reshard_rebuilds_the_config_without_the_command_line(tmp_path):
    """universal.py rebuilds the run's ResolvedConfig from the saved dict (for another DP size): every
    hyper-parameter and implementation setting survives, only the layout and accumulation follow the world."""
    from pipeline.training.config import ResolvedConfig, build_parser, resolve_config

    meta = {"tokenizer": {"vocab_size": 1000, "sha256": "0" * 64},
            "special_tokens": {"bos": 0, "pad": 1, "eos": 2, "unk": 3, "mask": 4}}
    args = build_parser().parse_args(["--data-prefix", "d", "--micro-batch-size", "2", "--global-batch-size", "8",
                                      "--lr", "3e-3", "--masking-rate", "0.3", "--model-set", "hidden_dropout=0.0",
                                      "--tensor-parallel-size", "2", "--deepspeed_config", "zero3_fp32.json"])
    original = resolve_config(args, 4, meta, "cpu", False, True)
    saved = json.loads(json.dumps(original.to_dict()))
    rebuilt = ResolvedConfig.from_dict(saved, 2, meta, "cpu", False, True, save=str(tmp_path))
    assert (rebuilt.tensor_parallel_size, rebuilt.data_parallel_size, rebuilt.gradient_accumulation_steps) == (2, 1, 4)
    assert rebuilt.model == original.model and rebuilt.training == original.training
    assert rebuilt.masking == original.masking and rebuilt.runtime.save == str(tmp_path)
    expected = dict(original.deepspeed, gradient_accumulation_steps=4)
    assert rebuilt.deepspeed == expected
    again = rebuilt.to_dict()
    assert again["parallel"]["tensor_parallel_size"] == 2 and "tensor_parallel_size" not in again["training"]
