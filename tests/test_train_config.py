"""Configuration and launcher discovery of run_pretrain.py, without starting DeepSpeed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.training import distributed
from pipeline.errors import ConfigError
from pipeline.training.schedule import lr_multiplier
from pipeline.training.config import (DS_CONFIG_DIR, TrainingConfig, build_deepspeed_config, build_parser,
                                      load_recipe)

REPO = Path(__file__).resolve().parent.parent


def test_lr_schedule_is_linear_warmup_then_linear_decay_to_zero():
    warmup, total = 6, 100
    lrs = [lr_multiplier(i, warmup, total) for i in range(total)]
    assert lrs[:6] == pytest.approx([1 / 6, 2 / 6, 3 / 6, 4 / 6, 5 / 6, 1.0])
    assert lrs[6] == pytest.approx(1.0) and lrs[-1] == pytest.approx(1 / 94) and lrs[50] > lrs[51]
    assert lr_multiplier(total, warmup, total) == 0.0
    assert lr_multiplier(0, 0, 10) == 1.0  # no warm-up


def test_recipes_hold_table_4():
    base, large = load_recipe("base"), load_recipe("large")
    assert base["model"] == {"preset": "base", "architecture": "3ml-self", "overrides": {"pre_ln": False}}
    assert base["training"] == {"seq_len": 512, "global_batch_size": 2048, "train_steps": 153000, "lr": 7e-4,
                                "warmup_proportion": 0.06, "weight_decay": 0.01, "adam_beta1": 0.9,
                                "adam_beta2": 0.98, "adam_eps": 1e-6, "grad_clip": 0.0}
    assert base["masking"]["rate"] == 0.4
    assert large["training"]["seq_len"] == 128 and large["training"]["global_batch_size"] == 4096
    assert large["training"]["lr"] == 2e-3 and large["training"]["train_steps"] == 23000
    assert large["model"]["overrides"]["pre_ln"] is True
    with pytest.raises(ConfigError, match="neither a file nor one of"):
        load_recipe("huge")


@pytest.mark.parametrize("path", sorted(p.name for p in DS_CONFIG_DIR.glob("zero*.json")))
def test_every_deepspeed_config_takes_hyper_parameters_from_training_config(path):
    training = TrainingConfig(global_batch_size=64, micro_batch_size=4, lr=2e-3, grad_clip=1.0)
    ds = build_deepspeed_config(DS_CONFIG_DIR / path, training, data_parallel_size=4, accelerator_name="cuda",
                                fp16_supported=True, bf16_supported=True)
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == \
        (64, 4, 4)
    assert ds["optimizer"]["params"]["lr"] == 2e-3 and ds["gradient_clipping"] == 1.0
    assert ds["zero_optimization"]["stage"] == int(path[4])
    assert not any(k.startswith("_") for k in ds)


def test_deepspeed_config_setting_a_hyper_parameter_is_refused(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"train_batch_size": 8, "optimizer": {"type": "AdamW", "params": {"lr": 1e-4}}}))
    with pytest.raises(ConfigError, match="train_batch_size, optimizer.params.lr: these are training"):
        build_deepspeed_config(bad, TrainingConfig(), 1, "cpu", False, True)
    fp16 = DS_CONFIG_DIR / "zero2_fp16.json"
    with pytest.raises(ConfigError, match="fp16 is not supported by the cpu accelerator"):
        build_deepspeed_config(fp16, TrainingConfig(), 1, "cpu", False, True)
    with pytest.raises(ConfigError, match="not a multiple of micro batch"):
        build_deepspeed_config(DS_CONFIG_DIR / "zero1_fp32.json", TrainingConfig(global_batch_size=10), 2, "cpu",
                               False, True)
    ds = build_deepspeed_config(DS_CONFIG_DIR / "zero2_bf16.json", TrainingConfig(), 1, "cpu", False, True)
    assert ds["optimizer"]["params"]["torch_adam"] is True  # fused Adam is GPU-only


def test_precision_labels_and_autocast_config(tmp_path):
    from pipeline.training.config import precision_of

    labels = {name: precision_of(build_deepspeed_config(DS_CONFIG_DIR / name, TrainingConfig(), 1, "cuda", True,
                                                        True))
              for name in ("zero2_fp32.json", "zero2_bf16.json", "zero2_fp16.json", "zero2_bf16_autocast.json")}
    assert labels == {"zero2_fp32.json": "fp32", "zero2_bf16.json": "bf16", "zero2_fp16.json": "fp16",
                      "zero2_bf16_autocast.json": "bf16-autocast"}
    both = tmp_path / "both.json"
    both.write_text(json.dumps({"torch_autocast": {"enabled": True, "dtype": "bfloat16"}, "bf16": {"enabled": True}}))
    with pytest.raises(ConfigError, match="torch_autocast keeps fp32 parameters"):
        build_deepspeed_config(both, TrainingConfig(), 1, "cuda", True, True)


def test_help_documents_every_argument():
    out = subprocess.run([sys.executable, str(REPO / "run_pretrain.py"), "--help"], capture_output=True,
                         text=True, cwd=REPO, timeout=120).stdout
    for flag in ("--recipe", "--architecture", "--model-preset", "--model-set", "--masking-rate",
                 "--masking-strategy", "--data-prefix", "--tokenizer", "--seq-len", "--global-batch-size",
                 "--micro-batch-size", "--train-steps", "--lr", "--warmup-proportion", "--weight-decay",
                 "--adam-beta1", "--adam-beta2", "--adam-eps", "--grad-clip", "--tensor-parallel-size", "--seed",
                 "--deepspeed_config", "--save", "--load", "--save-interval", "--keep-last", "--eval-interval",
                 "--log-interval", "--eval-iters", "--stop-at-step", "--peak-tflops"):
        assert flag in out, flag
    assert "Fraction of train_steps with a linear warm-up" in out  # the field metadata is the help text


def test_parser_leaves_unset_hyper_parameters_to_the_recipe():
    args = build_parser().parse_args(["--data-prefix", "x", "--lr", "0.5"])
    assert args.lr == 0.5 and args.seq_len is None and args.global_batch_size is None


def test_launch_discovery_env_slurm_single():
    env = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "1234"}
    assert distributed.discover_launch(env) == distributed.LaunchInfo("env", 3, 8, 1, "10.0.0.1", 1234)
    slurm = {"SLURM_PROCID": "5", "SLURM_STEP_ID": "0", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1",
             "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_JOB_ID": "4242"}
    info = distributed.discover_launch(slurm)
    assert (info.launcher, info.rank, info.world_size, info.local_rank) == ("slurm", 5, 8, 1)
    assert info.master_addr == "gpu07" and info.master_port == 29500 + 4242
    assert distributed.discover_launch(dict(slurm, MASTER_ADDR="ib-gpu07")).master_addr == "ib-gpu07"
    # A bare python in the batch script (no job step) is a single process, not rank 0 of SLURM_NTASKS.
    single = distributed.discover_launch({"SLURM_PROCID": "0", "SLURM_NTASKS": "8"})
    assert (single.launcher, single.world_size) == ("single", 1)


def test_slurm_nodelist_expansion_without_scontrol(monkeypatch):
    monkeypatch.setattr(distributed.shutil, "which", lambda name: None)
    assert distributed.expand_slurm_nodelist("gpu[01-03,07],login1") == ["gpu01", "gpu02", "gpu03", "gpu07",
                                                                        "login1"]
    assert distributed.expand_slurm_nodelist("node5") == ["node5"]


def test_recipe_resolves_to_table_4_and_explicit_options_win():
    from pipeline.training.config import resolve_config

    meta = {"tokenizer": {"vocab_size": 50265, "sha256": "0" * 64},
            "special_tokens": {"bos": 0, "pad": 1, "eos": 2, "unk": 3, "mask": 4}}
    args = build_parser().parse_args(["--data-prefix", "d", "--recipe", "base", "--micro-batch-size", "32"])
    config = resolve_config(args, world_size=8, dataset_meta=meta, accelerator_name="cuda", fp16_supported=True,
                            bf16_supported=True)
    resolved = config.to_dict()
    assert resolved["model"]["hidden_size"] == 768 and resolved["model"]["num_layers"] == 12
    assert resolved["model"]["pre_ln"] is False and resolved["model"]["architecture"] == "3ml-self"
    assert resolved["model"]["vocab_size"] == 50265
    assert resolved["masking"]["rate"] == 0.4
    training = resolved["training"]
    assert (training["seq_len"], training["global_batch_size"], training["lr"], training["train_steps"]) == \
        (512, 2048, 7e-4, 153000)
    assert config.training.warmup_steps == 9180
    assert resolved["parallel"] == {"tensor_parallel_size": 1, "data_parallel_size": 8,
                                    "gradient_accumulation_steps": 8, "zero_stage": 2, "precision": "fp16"}
    ds = resolved["deepspeed"]["config"]
    assert ds["optimizer"]["params"] == {"torch_adam": False, "lr": 7e-4, "betas": [0.9, 0.98], "eps": 1e-6,
                                         "weight_decay": 0.01}
    assert ds["gradient_clipping"] == 0.0 and ds["fp16"]["enabled"] is True

    args = build_parser().parse_args(["--data-prefix", "d", "--recipe", "large", "--micro-batch-size", "64",
                                      "--lr", "1e-3", "--tensor-parallel-size", "2",
                                      "--deepspeed_config", "zero1_bf16.json", "--model-set", "hidden_dropout=0.0"])
    config = resolve_config(args, 16, meta, "cuda", True, True)
    assert config.training.lr == 1e-3 and config.training.seq_len == 128 and config.training.global_batch_size == 4096
    assert config.model.pre_ln is True and config.model.num_layers == 24 and config.model.hidden_dropout == 0.0
    assert config.masking.rate == 0.5 and config.data_parallel_size == 8 and config.gradient_accumulation_steps == 8
    autocast_tp2 = build_parser().parse_args(["--data-prefix", "d", "--recipe", "large", "--micro-batch-size", "64",
                                              "--tensor-parallel-size", "2",
                                              "--deepspeed_config", "zero2_bf16_autocast.json"])
    assert resolve_config(autocast_tp2, 16, meta, "cuda", True, True).tensor_parallel_size == 2
    with pytest.raises(ConfigError, match="torch_autocast with --tensor-parallel-size 2 needs a CUDA device"):
        resolve_config(autocast_tp2, 16, meta, "cpu", False, True)
    with pytest.raises(ConfigError, match=r"unknown ModelConfig field\(s\) \['hidden'\]; known: .*hidden_size"):
        resolve_config(build_parser().parse_args(["--data-prefix", "d", "--model-set", "hidden=3"]), 1, meta,
                       "cpu", False, True)


def test_a_bad_setting_is_reported_before_the_distributed_start_up(tiny_dataset_prefix, tmp_path):
    """run_pretrain.py validates the whole configuration (flags, recipe, DeepSpeed JSON, dataset) before it
    creates a process group: the error line comes without a traceback and torch.distributed was never
    initialised (before, a config error came after ~12 s of distributed start-up)."""
    bad_ds = tmp_path / "bad.json"
    bad_ds.write_text(json.dumps({"train_batch_size": 8}))
    probe = ("import sys, torch.distributed as dist\n"
             "from pipeline.errors import run_cli\n"
             "from pipeline.training.trainer import main\n"
             "rc = run_cli(lambda: main(sys.argv[1:]))\n"
             "print('process group initialised:', dist.is_initialized())\n"
             "sys.exit(rc)\n")
    env = {"PYTHONPATH": str(REPO), "DS_ACCELERATOR": "cpu", "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
    cases = {("--deepspeed_config", str(bad_ds)): f"{bad_ds} sets train_batch_size",
             ("--recipe", "huge"): "recipe 'huge': neither a file nor one of",
             ("--global-batch-size", "6", "--micro-batch-size", "4"): "global batch 6 is not a multiple",
             ("--masking-rate", "1.5"): "masking: masking rate must be in (0, 1)"}
    for extra, expected in cases.items():
        proc = subprocess.run([sys.executable, "-c", probe, "--data-prefix", tiny_dataset_prefix, *extra],
                              capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
        assert proc.returncode == 1, proc.stderr[-2000:]
        assert f"error: {expected}" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]
        assert "process group initialised: False" in proc.stdout


def test_every_option_comes_from_a_documented_dataclass_field():
    """The command line is generated from the config dataclasses: every option has its field's help text."""
    import dataclasses

    from pipeline.training import config

    parser = build_parser()
    helps = {action.dest: action.help for action in parser._actions if action.dest != "help"}
    for cls in (config.ModelChoice, config.TrainingConfig, config.ParallelConfig, config.RuntimeConfig,
                config.LauncherOptions):
        for f in dataclasses.fields(cls):
            if f.metadata.get("cli", True) is False:
                assert f.name not in helps
                continue
            assert f.metadata["help"], f.name
            assert helps[f.name].startswith(f.metadata["help"].replace("%", "%%")), f.name
    assert set(helps) == {f.name for cls in (config.ModelChoice, config.TrainingConfig, config.ParallelConfig,
                                             config.RuntimeConfig, config.LauncherOptions)
                          for f in dataclasses.fields(cls) if f.metadata.get("cli", True) is not False}


def test_config_dataclasses_validate_when_built():
    from pipeline.training.config import ParallelConfig, RuntimeConfig

    with pytest.raises(ConfigError, match="lr must be > 0"):
        TrainingConfig(lr=0.0)
    with pytest.raises(ConfigError, match="micro_batch_size must be a positive integer"):
        TrainingConfig(micro_batch_size=0)
    with pytest.raises(ConfigError, match="--save-interval must be >= 1"):
        RuntimeConfig(save_interval=0)
    with pytest.raises(ConfigError, match="tensor_parallel_size 3 does not divide the world size 4"):
        ParallelConfig.for_world(3, 4)
