"""The hook-free data-parallel path (ZeRO stage 0: gradients accumulate in ``param.grad`` and are all-reduced
once per optimizer step) under DeepSpeed on 2 CPU ranks: with fp32 and gradient accumulation it logs the
losses ZeRO-2 logs (to 1e-6), TP=2 matches TP=1 on it, and a kill -9 mid-run resumes bitwise exactly. Also the
DeepSpeed switches around it: torch_autocast's lower-precision modules, DeepCompile, compute_grad_norm."""

from __future__ import annotations

import json

import pytest

from test_resume import PAUSE, latest, logged_steps, resume_and_compare
from test_train import assert_learns, baseline_run, layout_args
from train_launch import cached_run, launch, losses_by_step, wait_for

STEPS = 6
NO_DROPOUT = ["hidden_dropout=0.0", "attention_dropout=0.0"]


def _accumulating_run(tmp_path_factory, data, tok, stage: int, tp: int):
    """6 steps of 8 sequences in micro batches of 2: 2 accumulation steps per rank at DP=2 (TP=1), 4 at TP=2."""
    return cached_run(tmp_path_factory, ("accum", stage, tp),
                      lambda run_dir: layout_args(data, tok, run_dir, stage, tp, train_steps=STEPS,
                                                  micro_batch_size=2, model_set=NO_DROPOUT, eval_interval=3))


def test_zero0_with_accumulation_matches_zero2_and_tp2_matches_tp1(tmp_path_factory, tiny_dataset_prefix,
                                                                    tiny_tokenizer):
    zero2 = _accumulating_run(tmp_path_factory, tiny_dataset_prefix, tiny_tokenizer, 2, 1)
    zero0 = _accumulating_run(tmp_path_factory, tiny_dataset_prefix, tiny_tokenizer, 0, 1)
    config = json.loads((zero0 / "config.json").read_text())
    assert config["parallel"]["zero_stage"] == 0 and config["parallel"]["gradient_accumulation_steps"] == 2
    expected, got = losses_by_step(zero2), losses_by_step(zero0)
    assert sorted(got) == list(range(1, STEPS + 1))
    assert got == pytest.approx(expected, rel=0, abs=1e-6), (got, expected)
    assert got[STEPS] < got[1] - 0.1  # it learns

    zero0_tp2 = _accumulating_run(tmp_path_factory, tiny_dataset_prefix, tiny_tokenizer, 0, 2)
    config = json.loads((zero0_tp2 / "config.json").read_text())
    assert config["parallel"]["tensor_parallel_size"] == 2 and config["parallel"]["gradient_accumulation_steps"] == 4
    # Split matmuls and all-reduces sum in another order: equal up to float32 rounding grown over 6 Adam steps.
    assert losses_by_step(zero0_tp2) == pytest.approx(got, rel=0, abs=2e-4)


def test_zero0_kill_9_mid_run_resumes_exactly(tmp_path, tmp_path_factory, tiny_dataset_prefix, tiny_tokenizer):
    baseline = baseline_run(tmp_path_factory, tiny_dataset_prefix, tiny_tokenizer, 0, 1)
    assert_learns(baseline)
    run_dir = tmp_path / "run"
    started = launch(layout_args(tiny_dataset_prefix, tiny_tokenizer, run_dir, 0, 1, save_interval=4),
                     tmp_path / "l1", env_extra={"PRETRAIN_TEST_PAUSE_AFTER_STEP": f"6:{PAUSE}"})
    wait_for(lambda: logged_steps(run_dir) >= 6, 120, "step 6", started)
    started.kill()
    assert latest(run_dir) == "step_00000004"
    resume_and_compare(run_dir, baseline, tmp_path / "l2", tiny_dataset_prefix, tiny_tokenizer, stage=0)


@pytest.mark.parametrize("name", ["zero0_bf16_autocast.json", "zero2_bf16_autocast.json"])
def test_autocast_configs_communicate_megatron_linear_gradients_in_bf16(single_process_group, monkeypatch, name):
    """DeepSpeed matches lower_precision_safe_modules by exact class (``module.__class__ in ...``), so the
    config must name our megatron-core subclasses: their weights then carry the bf16 communication dtype
    (ZeRO-1/2 bucket gradients by it); LayerNorms and embeddings stay fp32."""
    import torch
    from deepspeed.runtime.torch_autocast import get_comm_dtype

    from model import build_model
    from model.config import ModelConfig
    from model.layers import ColumnLinear, RowLinear
    from pipeline.training.config import DS_CONFIG_DIR, TrainingConfig, build_deepspeed_config
    from pipeline.training.engine import build_engine

    monkeypatch.setenv("LOCAL_RANK", "0")
    training = TrainingConfig(seq_len=32, global_batch_size=2, micro_batch_size=2)
    ds = build_deepspeed_config(DS_CONFIG_DIR / name, training, 1, "cpu", False, True)
    model = build_model(ModelConfig.preset("tiny", "3ml-self", vocab_size=300), init_seed=1)
    build_engine(model, training, ds)
    linear = [m for m in model.modules() if isinstance(m, (ColumnLinear, RowLinear, torch.nn.Linear))]
    assert any(isinstance(m, ColumnLinear) for m in linear) and any(isinstance(m, RowLinear) for m in linear)
    for module in linear:
        assert {get_comm_dtype(p) for p in module.parameters(recurse=False)} == {torch.bfloat16}, module
    assert get_comm_dtype(model.encoder.embeddings.layernorm.weight) == torch.float32
    assert get_comm_dtype(model.encoder.embeddings.word_embeddings.weight) == torch.float32


def test_deepcompile_and_grad_norm_switches_are_checked(tmp_path):
    from pipeline.errors import ConfigError
    from pipeline.training.config import DS_CONFIG_DIR, TrainingConfig, build_deepspeed_config

    deepcompile = DS_CONFIG_DIR / "zero2_bf16_autocast_deepcompile.json"
    ds = build_deepspeed_config(deepcompile, TrainingConfig(), 1, "cuda", True, True)
    assert ds["compile"] == {"deepcompile": True} and ds["zero_optimization"]["stage"] == 2
    with pytest.raises(ConfigError, match="DeepCompile .* runs on CUDA only in DeepSpeed 0.19.8, not on the cpu"):
        build_deepspeed_config(deepcompile, TrainingConfig(), 1, "cpu", False, True)
    # DeepSpeed 0.19.8's zero_optimization.compute_grad_norm=false skips the per-parameter fp64 norms of
    # ZeRO-1/2 when clipping is off; with clipping, or at another stage, DeepSpeed would fail at start-up.
    no_norm = tmp_path / "zero2_no_norm.json"
    settings = json.loads((DS_CONFIG_DIR / "zero2_fp32.json").read_text())
    settings["zero_optimization"]["compute_grad_norm"] = False
    no_norm.write_text(json.dumps(settings))
    assert build_deepspeed_config(no_norm, TrainingConfig(grad_clip=0.0), 1, "cpu", False, True)
    with pytest.raises(ConfigError, match="compute_grad_norm=false needs ZeRO stage 1 or 2 and --grad-clip 0"):
        build_deepspeed_config(no_norm, TrainingConfig(grad_clip=1.0), 1, "cpu", False, True)
