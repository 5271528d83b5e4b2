"""Pre-training under DeepSpeed on 2 CPU ranks: every ZeRO stage with TP=1/DP=2 and TP=2/DP=1 learns on the
Lee corpus; bf16 runs; fp16 (dynamic loss scaling) runs where the accelerator supports it -- DeepSpeed's CPU
accelerator does on CPUs with AVX512-FP16, CUDA GPUs do. The launchers are spread over the matrix
(direct env launch as srun does, torchrun, the deepspeed launcher, mpirun via mpi4py discovery)."""

from __future__ import annotations

import json

import pytest

from train_launch import cached_run, read_metrics, run, tiny_args

STEPS = 12
LR = 1e-2
# (zero stage, tensor-parallel size) -> launcher; each launcher is exercised once or more.
LAYOUTS = {
    (0, 1): "env", (0, 2): "env", (1, 1): "env", (1, 2): "deepspeed",
    (2, 1): "env", (2, 2): "torchrun", (3, 1): "mpirun", (3, 2): "env",
}


def layout_args(data_prefix, tokenizer, run_dir, stage: int, tp: int, precision: str = "fp32", **overrides):
    options = dict(train_steps=STEPS, lr=LR, deepspeed_config=f"zero{stage}_{precision}.json",
                   tensor_parallel_size=tp)
    options.update(overrides)
    return tiny_args(str(data_prefix), str(tokenizer), run_dir, **options)


def baseline_run(tmp_path_factory, data_prefix, tokenizer, stage: int, tp: int):
    """The uninterrupted 12-step run of a layout (shared with tests/test_resume.py)."""
    return cached_run(tmp_path_factory, ("fp32", stage, tp),
                      lambda run_dir: layout_args(data_prefix, tokenizer, run_dir, stage, tp),
                      launcher=LAYOUTS[(stage, tp)])


def assert_learns(run_dir, steps: int = STEPS, drop: float = 0.4):
    train = read_metrics(run_dir)
    losses = [r["loss"] for r in train]
    assert [r["step"] for r in train] == list(range(1, steps + 1))
    assert all(l == l and l < 20 for l in losses), losses  # finite
    tail = losses[-4:]
    assert sum(tail) / len(tail) < losses[0] - drop, f"loss did not fall enough: {losses}"
    evals = read_metrics(run_dir, "eval")
    assert evals[0]["step"] == 0 and evals[-1]["loss"] < evals[0]["loss"], evals
    for record in evals:
        for kind in ("masked", "replaced", "unchanged"):
            assert record[f"ppl_{kind}"] > 1.0
    return losses


@pytest.mark.parametrize("stage,tp", list(LAYOUTS), ids=[f"zero{s}-tp{t}-{l}" for (s, t), l in LAYOUTS.items()])
def test_each_zero_stage_and_tp_layout_learns(tmp_path_factory, tiny_dataset_prefix, tiny_tokenizer, stage, tp):
    run_dir = baseline_run(tmp_path_factory, tiny_dataset_prefix, tiny_tokenizer, stage, tp)
    assert_learns(run_dir)
    config = json.loads((run_dir / "config.json").read_text())
    assert config["parallel"] == {"tensor_parallel_size": tp, "data_parallel_size": 2 // tp,
                                  "gradient_accumulation_steps": 8 // (4 * (2 // tp)),
                                  "zero_stage": stage, "precision": "fp32"}
    # The DeepSpeed JSON received the batch sizes and optimiser settings from TrainingConfig.
    ds = config["deepspeed"]["config"]
    assert ds["train_batch_size"] == 8 and ds["train_micro_batch_size_per_gpu"] == 4
    assert ds["optimizer"]["params"]["lr"] == LR and ds["optimizer"]["params"]["betas"] == [0.9, 0.98]
    assert (run_dir / "checkpoints" / "latest").read_text() == f"step_{STEPS:08d}"
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))


@pytest.mark.parametrize("stage,tp", [(2, 1), (3, 2)], ids=["zero2-tp1", "zero3-tp2"])
def test_bf16_learns(tmp_path, tiny_dataset_prefix, tiny_tokenizer, stage, tp):
    run_dir = tmp_path / "run"
    run(layout_args(tiny_dataset_prefix, tiny_tokenizer, run_dir, stage, tp, "bf16"), tmp_path / "logs")
    assert_learns(run_dir, drop=0.3)
    assert json.loads((run_dir / "config.json").read_text())["parallel"]["precision"] == "bf16"


@pytest.mark.timeout(900)
def test_bf16_autocast_with_compiled_layers_learns(tmp_path, tiny_dataset_prefix, tiny_tokenizer):
    """The fastest H100 setting (README, Performance): DeepSpeed's torch_autocast mode + --compile, ZeRO-2."""
    run_dir = tmp_path / "run"
    started = run(layout_args(tiny_dataset_prefix, tiny_tokenizer, run_dir, 2, 1, "bf16_autocast", compile=True),
                  tmp_path / "logs")
    # tiny 3MLself: 2 encoder layers + 1 decoder layer, the decoder's head transform, the output layer.
    assert "torch.compile: 5 modules" in started.output()
    assert_learns(run_dir, drop=0.3)
    config = json.loads((run_dir / "config.json").read_text())
    assert config["parallel"]["precision"] == "bf16-autocast" and config["runtime"]["compile"] == "layers"


@pytest.mark.timeout(900)
def test_compiled_layers_at_tp2_learn(tmp_path, tiny_dataset_prefix, tiny_tokenizer):
    """--compile at TP=2: the Transformer layers compile through megatron-core's forward (its autograd functions
    and all-reduces), the vocabulary loss stays megatron's vocab-parallel one (not compiled)."""
    run_dir = tmp_path / "run"
    started = run(layout_args(tiny_dataset_prefix, tiny_tokenizer, run_dir, 2, 2, architecture="3ml-cross",
                              compile=True), tmp_path / "logs")
    # tiny 3MLcross: 2 encoder layers + 1 decoder layer, two head transforms; the TP=2 output layer is not compiled.
    assert "torch.compile: 5 modules" in started.output()
    assert_learns(run_dir, drop=0.3)


def test_fp16_when_supported(tmp_path, tiny_dataset_prefix, tiny_tokenizer):
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    if not accelerator.is_fp16_supported():
        # The clear refusal of an fp16 config on such an accelerator is checked in test_train_config.py.
        pytest.skip(f"fp16 not supported by the {accelerator.device_name()} accelerator")
    run_dir = tmp_path / "run"
    run(layout_args(tiny_dataset_prefix, tiny_tokenizer, run_dir, 2, 1, "fp16"), tmp_path / "logs")
    losses = assert_learns(run_dir, drop=0.3)
    scales = [r["loss_scale"] for r in read_metrics(run_dir)]
    assert all(s is not None and s >= 1 for s in scales), scales
    print(f"fp16 on {accelerator.device_name()}: losses {losses}, loss scales {scales}")
