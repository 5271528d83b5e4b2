"""Pre-training under DeepSpeed: configuration, engine, training loop, validation, checkpoints, logging.

Launch with any of::

    deepspeed --num_gpus 8 run_pretrain.py --data-prefix data/wiki --save runs/base --recipe base
    torchrun --nproc_per_node 8 run_pretrain.py ...
    srun python run_pretrain.py ...          (one task per GPU)
    mpirun -np 8 python run_pretrain.py ...

Two kinds of settings, kept apart (as in Cramming):

* hyper-parameters -- the model (a ``ModelConfig`` preset plus overrides), the masking (``MaskingConfig``) and
  the optimisation (``TrainingConfig`` below) -- come from the command line or a recipe (``--recipe base`` is
  the paper's Table 4 3MLself-base recipe, ``ds_configs/recipe_*.json``);
* implementation settings -- ZeRO stage, precision, communication buckets -- come from the DeepSpeed JSON
  (``--deepspeed_config ds_configs/zero2_bf16.json``). Batch sizes, learning rate, Adam and clipping are written
  *into* that JSON from ``TrainingConfig``; a JSON that sets them itself is refused, so there is one source.

The resolved configuration is logged, written to ``RUN_DIR/config.json`` and saved in every checkpoint.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from pipeline.errors import ConfigError
from pipeline.training.schedule import lr_multiplier

REPO_ROOT = Path(__file__).resolve().parents[2]
DS_CONFIG_DIR = REPO_ROOT / "ds_configs"
DEFAULT_DS_CONFIG = "zero2_fp32.json"
KIND_LABELS = ("masked", "replaced", "unchanged")
# Test hooks: "STEP:SECONDS". Sleep inside the save of STEP after DeepSpeed wrote its files (so a test can
# kill -9 a save deterministically), or after STEP finished (so a test can kill -9 mid-run).
PAUSE_IN_SAVE_ENV = "PRETRAIN_TEST_PAUSE_IN_SAVE"
PAUSE_AFTER_STEP_ENV = "PRETRAIN_TEST_PAUSE_AFTER_STEP"
STOPPED_BY_SIGNAL_FILE = "stopped_by_signal"
METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.json"
# Keys of the resolved config that may change between a checkpoint and its resume: where things go, how often
# we log/evaluate/save, and for how long we train (extending a run recomputes the LR schedule's horizon).
RESUMABLE_CHANGES = ("runtime", "launch", "data.prefix", "data.tokenizer", "training.train_steps",
                     "deepspeed.config_file")


# ------------------------------------------------------------------------------------------- configuration

@dataclass
class TrainingConfig:
    """Optimisation hyper-parameters (paper Table 4 for the recipes)."""

    seq_len: int = 128
    """Tokens per packed training sequence."""
    global_batch_size: int = 32
    """Sequences per optimizer step over all data-parallel ranks (= micro batch x accumulation x DP size)."""
    micro_batch_size: int = 8
    """Sequences per forward/backward on one data-parallel rank (memory-bound implementation choice)."""
    train_steps: int = 1000
    """Optimizer steps; the linear LR decay reaches 0 at this step."""
    lr: float = 1e-3
    """Peak learning rate, reached at the end of the warm-up."""
    warmup_proportion: float = 0.06
    """Fraction of ``train_steps`` with a linear warm-up from 0 to ``lr``; then linear decay to 0."""
    weight_decay: float = 0.01
    """AdamW decoupled weight decay (not applied to biases and LayerNorm parameters)."""
    adam_beta1: float = 0.9
    adam_beta2: float = 0.98
    adam_eps: float = 1e-6
    grad_clip: float = 0.0
    """Global gradient-norm clipping threshold; 0 disables it (paper: 0, or 1.0 if gradients explode)."""
    seed: int = 1234
    """Seed of weight initialisation, dropout and data order."""
    tensor_parallel_size: int = 1
    """Megatron tensor-parallel degree; the remaining ranks are data-parallel."""

    def validate(self) -> None:
        positive = ("seq_len", "global_batch_size", "micro_batch_size", "train_steps", "tensor_parallel_size")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if not self.lr > 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")
        if not 0.0 <= self.warmup_proportion < 1.0:
            raise ConfigError(f"warmup_proportion must be in [0, 1), got {self.warmup_proportion}")
        if self.weight_decay < 0 or self.grad_clip < 0:
            raise ConfigError("weight_decay and grad_clip must be >= 0")
        if not (0 <= self.adam_beta1 < 1 and 0 <= self.adam_beta2 < 1 and self.adam_eps > 0):
            raise ConfigError("Adam betas must be in [0, 1) and eps > 0")

    @property
    def warmup_steps(self) -> int:
        return int(round(self.warmup_proportion * self.train_steps))

    def gradient_accumulation_steps(self, data_parallel_size: int) -> int:
        per_step = self.micro_batch_size * data_parallel_size
        if self.global_batch_size % per_step:
            raise ConfigError(f"global batch {self.global_batch_size} is not a multiple of micro batch "
                              f"{self.micro_batch_size} x data-parallel size {data_parallel_size}")
        return self.global_batch_size // per_step


@dataclass
class RuntimeConfig:
    """Where output goes and how often things happen; free to change when resuming."""

    data_prefix: str = ""
    tokenizer: str | None = None
    save: str | None = None
    load: str | None = None
    save_interval: int = 1000
    keep_last: int = 3
    log_interval: int = 10
    eval_interval: int = 1000
    eval_iters: int = 10
    stop_at_step: int | None = None
    num_workers: int = 2
    peak_tflops: float | None = None
    progress_bar: bool = True
    deepspeed_config: str = DEFAULT_DS_CONFIG
    compile: bool = False
    """``torch.compile`` the Transformer and prediction layers (``model.layers.compile_layers``): an
    implementation setting that leaves parameters and checkpoints unchanged, so a resume may change it."""


def load_recipe(name_or_path: str) -> dict:
    """``base``/``large`` (``ds_configs/recipe_NAME.json``) or a path to a recipe JSON."""
    path = Path(name_or_path)
    if not path.is_file():
        path = DS_CONFIG_DIR / f"recipe_{name_or_path}.json"
    if not path.is_file():
        raise ConfigError(f"recipe {name_or_path!r}: neither a file nor one of "
                          f"{sorted(p.stem[len('recipe_'):] for p in DS_CONFIG_DIR.glob('recipe_*.json'))}")
    try:
        recipe = json.loads(path.read_text())
    except ValueError as error:
        raise ConfigError(f"{path}: invalid JSON ({error})") from None
    unknown = set(recipe) - {"_comment", "model", "masking", "training", "deepspeed_config"}
    if unknown:
        raise ConfigError(f"{path}: unknown recipe sections {sorted(unknown)}")
    recipe["_path"] = str(path)
    return recipe


def resolve_deepspeed_config_path(name: str) -> Path:
    path = Path(name)
    if path.is_file():
        return path
    if (DS_CONFIG_DIR / name).is_file():
        return DS_CONFIG_DIR / name
    raise ConfigError(f"DeepSpeed config {name!r} not found (looked in . and {DS_CONFIG_DIR})")


# Keys a DeepSpeed JSON must leave to TrainingConfig.
_HYPER_PARAMETER_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                         "gradient_clipping", "scheduler")
_OPTIMIZER_HYPER_PARAMETERS = ("lr", "betas", "eps", "weight_decay")


def build_deepspeed_config(path: Path, training: TrainingConfig, data_parallel_size: int,
                           accelerator_name: str, fp16_supported: bool, bf16_supported: bool) -> dict:
    """The implementation settings of ``path`` with the hyper-parameters of ``training`` written in."""
    try:
        ds = json.loads(Path(path).read_text())
    except ValueError as error:
        raise ConfigError(f"{path}: invalid JSON ({error})") from None
    ds = {k: v for k, v in ds.items() if not k.startswith("_")}
    clashes = [k for k in _HYPER_PARAMETER_KEYS if k in ds]
    optimizer = ds.setdefault("optimizer", {"type": "AdamW", "params": {}})
    params = optimizer.setdefault("params", {})
    clashes += [f"optimizer.params.{k}" for k in _OPTIMIZER_HYPER_PARAMETERS if k in params]
    if clashes:
        raise ConfigError(f"{path} sets {', '.join(clashes)}: these are training hyper-parameters, given on the "
                          "command line (TrainingConfig); remove them from the DeepSpeed config")
    if str(optimizer.get("type", "")).lower() not in ("adamw", "adam"):
        raise ConfigError(f"{path}: optimizer type must be AdamW (got {optimizer.get('type')!r})")
    if ds.get("fp16", {}).get("enabled") and ds.get("bf16", {}).get("enabled"):
        raise ConfigError(f"{path}: fp16 and bf16 are both enabled")
    if ds.get("torch_autocast", {}).get("enabled") and (ds.get("fp16", {}).get("enabled")
                                                        or ds.get("bf16", {}).get("enabled")):
        raise ConfigError(f"{path}: torch_autocast keeps fp32 parameters; disable its fp16/bf16 section")
    if ds.get("fp16", {}).get("enabled") and not fp16_supported:
        raise ConfigError(f"{path}: fp16 is not supported by the {accelerator_name} accelerator; use a bf16 or "
                          "fp32 config")
    if ds.get("bf16", {}).get("enabled") and not bf16_supported:
        raise ConfigError(f"{path}: bf16 is not supported by the {accelerator_name} accelerator")
    if accelerator_name == "cpu":
        # DeepSpeed's fused Adam kernels are GPU-only; torch's AdamW is also what makes CPU runs bitwise
        # reproducible across a resume.
        params["torch_adam"] = True
    optimizer["type"] = "AdamW"
    params.update({"lr": training.lr, "betas": [training.adam_beta1, training.adam_beta2],
                   "eps": training.adam_eps, "weight_decay": training.weight_decay})
    ds["train_batch_size"] = training.global_batch_size
    ds["train_micro_batch_size_per_gpu"] = training.micro_batch_size
    ds["gradient_accumulation_steps"] = training.gradient_accumulation_steps(data_parallel_size)
    ds["gradient_clipping"] = training.grad_clip
    ds.setdefault("steps_per_print", 10 ** 9)  # we log ourselves
    return ds


def precision_of(ds_config: dict) -> str:
    autocast = ds_config.get("torch_autocast", {})
    if autocast.get("enabled"):
        dtype = str(autocast.get("dtype", "bfloat16")).replace("torch.", "")
        return {"bfloat16": "bf16", "float16": "fp16"}.get(dtype, dtype) + "-autocast"
    if ds_config.get("fp16", {}).get("enabled"):
        return "fp16"
    if ds_config.get("bf16", {}).get("enabled"):
        return "bf16"
    return "fp32"


def parse_model_overrides(items: Sequence[str]) -> dict:
    """``["hidden_size=256", "pre_ln=true"]`` -> {"hidden_size": 256, "pre_ln": True} (values parsed as JSON,
    else kept as strings)."""
    overrides = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--model-set {item!r}: expected KEY=VALUE")
        key, raw = item.split("=", 1)
        try:
            value = json.loads(raw)
        except ValueError:
            value = raw
        overrides[key.strip()] = value
    return overrides


@dataclass
class ResolvedConfig:
    """Everything a run is: the single source every component reads, logged and saved with checkpoints."""

    model: Any  # model.config.ModelConfig
    masking: Any  # pipeline.data.masking.MaskingConfig
    training: TrainingConfig
    runtime: RuntimeConfig
    deepspeed: dict
    deepspeed_config_file: str
    tensor_parallel_size: int
    data_parallel_size: int
    recipe: str | None = None
    dataset_meta: dict = field(default_factory=dict)
    launch: dict = field(default_factory=dict)

    @property
    def gradient_accumulation_steps(self) -> int:
        return self.training.gradient_accumulation_steps(self.data_parallel_size)

    def to_dict(self) -> dict:
        masking = {"rate": self.masking.rate, "strategy": self.masking.strategy, "seed": self.masking.seed,
                   "pad_multiple": self.masking.pad_multiple}
        return {
            "model": self.model.to_dict(),
            "masking": masking,
            "training": dataclasses.asdict(self.training),
            "parallel": {"tensor_parallel_size": self.tensor_parallel_size,
                         "data_parallel_size": self.data_parallel_size,
                         "gradient_accumulation_steps": self.gradient_accumulation_steps,
                         "zero_stage": int(self.deepspeed.get("zero_optimization", {}).get("stage", 0)),
                         "precision": precision_of(self.deepspeed)},
            "data": {"prefix": self.runtime.data_prefix, "tokenizer": self.runtime.tokenizer,
                     "vocab_size": self.dataset_meta.get("tokenizer", {}).get("vocab_size")},
            "deepspeed": {"config_file": self.deepspeed_config_file, "config": self.deepspeed},
            "recipe": self.recipe,
            "runtime": dataclasses.asdict(self.runtime),
            "launch": self.launch,
        }


class _HelpFormatter(argparse.HelpFormatter):
    """Shows a default only where there is one: hyper-parameters default to None so a recipe can fill them,
    and their help text states the TrainingConfig default itself."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default not in (None, False, [], argparse.SUPPRESS) and "default" not in text:
            text += " [default: %(default)s]"
        return text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="run_pretrain.py",
        description="Pre-train MLM / 3MLself / 3MLcross with DeepSpeed (ZeRO 0-3, tensor parallelism, fp16/bf16). "
                    "Hyper-parameters: a recipe and/or the options below (explicit options win over the recipe). "
                    "Implementation settings: --deepspeed_config.",
        formatter_class=_HelpFormatter)
    g = parser.add_argument_group("recipe and model")
    g.add_argument("--recipe", help="paper recipe 'base' (3MLself-base, Table 4) or 'large', or a recipe JSON path")
    g.add_argument("--architecture", choices=["mlm", "3ml-self", "3ml-cross"],
                   help="model architecture [default: 3ml-self]")
    g.add_argument("--model-preset", help="model size preset: tiny, mini, base, large [default: tiny]")
    g.add_argument("--model-set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a ModelConfig field, repeatable (e.g. --model-set hidden_size=256 "
                        "--model-set pre_ln=true --model-set hidden_dropout=0.0)")
    g = parser.add_argument_group("masking")
    g.add_argument("--masking-rate", type=float, help="fraction of tokens corrupted [default: 0.4]")
    g.add_argument("--masking-strategy", help="percent <mask>-random-unchanged [default: 80-10-10]")
    g.add_argument("--masking-seed", type=int, help="seed of the corruption [default: --seed]")
    g = parser.add_argument_group("data")
    g.add_argument("--data-prefix", required=True,
                   help="prefix P written by pipeline.data.preprocess (P_train.*, P_valid.*, P.meta.json)")
    g.add_argument("--tokenizer", help="tokenizer.json (or its directory); checked against the dataset's meta.json")
    g.add_argument("--num-workers", type=int, default=2, help="DataLoader worker processes per rank")
    g = parser.add_argument_group("optimisation (TrainingConfig)")
    for f in dataclasses.fields(TrainingConfig):
        flag = "--" + f.name.replace("_", "-")
        doc = (f.metadata or {}).get("help")
        parser_kind = float if f.type in ("float", float) else int
        g.add_argument(flag, type=parser_kind, dest=f.name,
                       help=f"{doc or _FIELD_HELP.get(f.name, '')} [default: {f.default}]")
    g = parser.add_argument_group("DeepSpeed")
    g.add_argument("--deepspeed_config", "--deepspeed-config", dest="deepspeed_config",
                   help=f"implementation settings JSON (ds_configs/*.json) [default: {DEFAULT_DS_CONFIG}]")
    g.add_argument("--local_rank", "--local-rank", type=int, default=None,
                   help="set by the deepspeed launcher; LOCAL_RANK from the environment is used")
    g.add_argument("--deepspeed", action="store_true", help="accepted for launcher compatibility; always on")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the Transformer and prediction layers (GPU: ~1 min to compile, then "
                        "~20%% faster steps; README, Performance)")
    g = parser.add_argument_group("checkpoints and logging")
    g.add_argument("--save", help="run directory: checkpoints/, metrics.jsonl, tensorboard/, config.json")
    g.add_argument("--load", help="resume from a run directory, its checkpoints/ directory or one checkpoint tag "
                                  "directory; an empty or missing directory starts from scratch")
    g.add_argument("--save-interval", type=int, default=1000, help="save a checkpoint every N steps")
    g.add_argument("--keep-last", type=int, default=3, help="keep the newest K checkpoints (0: keep all)")
    g.add_argument("--log-interval", type=int, default=10, help="log metrics every N steps")
    g.add_argument("--eval-interval", type=int, default=1000, help="validate every N steps (0: never)")
    g.add_argument("--eval-iters", type=int, default=10, help="validation micro batches per data-parallel rank")
    g.add_argument("--stop-at-step", type=int,
                   help="save and exit after this step (the LR schedule still spans --train-steps)")
    g.add_argument("--peak-tflops", type=float,
                   help="peak TFLOP/s of one device for MFU (e.g. 312 for A100 bf16, 125 for V100 fp16)")
    g.add_argument("--no-progress-bar", action="store_true", help="plain log lines instead of a tqdm bar")
    return parser


_FIELD_HELP = {"adam_beta1": "Adam beta1", "adam_beta2": "Adam beta2", "adam_eps": "Adam epsilon"}


def _attribute_docs(cls) -> dict[str, str]:
    """Docstrings written under dataclass fields (``x: int = 1`` followed by a string literal)."""
    import ast
    import inspect
    import textwrap

    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    docs, previous = {}, None
    for node in tree.body[0].body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            previous = node.target.id
        elif previous and isinstance(node, ast.Expr) and isinstance(getattr(node, "value", None), ast.Constant) \
                and isinstance(node.value.value, str):
            docs[previous] = " ".join(node.value.value.split())
            previous = None
        else:
            previous = None
    return docs


# The attribute docstrings of TrainingConfig are the --help text: one source for the documentation.
_FIELD_HELP.update(_attribute_docs(TrainingConfig))


def resolve_config(args: argparse.Namespace, world_size: int, dataset_meta: dict,
                   accelerator_name: str, fp16_supported: bool, bf16_supported: bool) -> ResolvedConfig:
    """Explicit options > recipe > defaults, validated."""
    from model.config import ModelConfig
    from pipeline.data.masking import MaskingConfig

    recipe = load_recipe(args.recipe) if args.recipe else {}
    recipe_training = recipe.get("training", {})
    unknown = set(recipe_training) - {f.name for f in dataclasses.fields(TrainingConfig)}
    if unknown:
        raise ConfigError(f"{recipe['_path']}: unknown training keys {sorted(unknown)}")
    training_values = dict(recipe_training)
    for f in dataclasses.fields(TrainingConfig):
        if getattr(args, f.name) is not None:
            training_values[f.name] = getattr(args, f.name)
    training = TrainingConfig(**training_values)
    training.validate()

    tp = training.tensor_parallel_size
    if world_size % tp:
        raise ConfigError(f"tensor_parallel_size {tp} does not divide the world size {world_size}")
    dp = world_size // tp
    training.gradient_accumulation_steps(dp)  # validates divisibility

    recipe_model = recipe.get("model", {})
    architecture = args.architecture or recipe_model.get("architecture", "3ml-self")
    preset = args.model_preset or recipe_model.get("preset", "tiny")
    tokenizer_meta = dataset_meta["tokenizer"]
    overrides = {"vocab_size": int(tokenizer_meta["vocab_size"]),
                 "pad_token_id": int(dataset_meta["special_tokens"]["pad"])}
    overrides.update(recipe_model.get("overrides", {}))
    overrides.update(parse_model_overrides(args.model_set))
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ConfigError(f"unknown ModelConfig field(s) {unknown}; known: {', '.join(sorted(known))}")
    try:
        model_config = ModelConfig.preset(preset, architecture, **overrides)
        model_config.check_tensor_parallel_size(tp)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"model config: {error}") from None
    if training.seq_len > model_config.max_positions:
        raise ConfigError(f"seq_len {training.seq_len} exceeds the model's max_positions "
                          f"{model_config.max_positions} (--model-set max_positions=...)")

    recipe_masking = recipe.get("masking", {})
    try:
        masking = MaskingConfig(
            rate=args.masking_rate if args.masking_rate is not None else recipe_masking.get("rate", 0.4),
            strategy=args.masking_strategy or recipe_masking.get("strategy", "80-10-10"),
            seed=args.masking_seed if args.masking_seed is not None else recipe_masking.get("seed", training.seed))
    except ValueError as error:
        raise ConfigError(f"masking: {error}") from None

    ds_name = args.deepspeed_config or recipe.get("deepspeed_config") or DEFAULT_DS_CONFIG
    ds_path = resolve_deepspeed_config_path(ds_name)
    ds_config = build_deepspeed_config(ds_path, training, dp, accelerator_name, fp16_supported, bf16_supported)
    if ds_config.get("torch_autocast", {}).get("enabled") and tp > 1 and accelerator_name != "cuda":
        # megatron-core's TP autograd functions re-enter autocast in backward for device "cuda" only; elsewhere
        # the backward matmul would mix bf16 gradients with fp32 weights.
        raise ConfigError(f"{ds_path}: torch_autocast with --tensor-parallel-size {tp} needs a CUDA device "
                          f"(megatron-core's tensor-parallel layers restore autocast in backward only there); on "
                          f"{accelerator_name} use a *_bf16.json config")

    runtime = RuntimeConfig(
        data_prefix=str(args.data_prefix), tokenizer=args.tokenizer, save=args.save, load=args.load,
        save_interval=args.save_interval, keep_last=args.keep_last, log_interval=args.log_interval,
        eval_interval=args.eval_interval, eval_iters=args.eval_iters, stop_at_step=args.stop_at_step,
        num_workers=args.num_workers, peak_tflops=args.peak_tflops, progress_bar=not args.no_progress_bar,
        deepspeed_config=str(ds_path), compile=args.compile)
    for name in ("save_interval", "log_interval", "eval_iters"):
        if getattr(runtime, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1")
    if runtime.eval_interval < 0 or runtime.keep_last < 0 or runtime.num_workers < 0:
        raise ConfigError("--eval-interval, --keep-last and --num-workers must be >= 0")
    return ResolvedConfig(model=model_config, masking=masking, training=training, runtime=runtime,
                          deepspeed=ds_config, deepspeed_config_file=str(ds_path), tensor_parallel_size=tp,
                          data_parallel_size=dp, recipe=recipe.get("_path"), dataset_meta=dataset_meta)


# ---------------------------------------------------------------------------------------------- signals

class StopSignal:
    """Remembers SIGTERM / SIGUSR1 (Slurm's pre-emption warning); the loop stops at the next step boundary."""

    def __init__(self):
        self.received: int | None = None
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handler)

    def _handler(self, signum, frame):
        self.received = signum


def _ignore_stop_signals_in_worker(worker_init_fn):
    """DataLoader workers must survive a SIGTERM sent to the whole process group: the main process decides
    when to stop (after saving) and shuts its workers down itself."""
    def init(worker_id):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)
        if worker_init_fn is not None:
            worker_init_fn(worker_id)
    return init


def _pause_hook(env_name: str, step: int) -> float:
    value = os.environ.get(env_name, "")
    if ":" in value:
        at, seconds = value.split(":", 1)
        if int(at) == step:
            return float(seconds)
    return 0.0


# ---------------------------------------------------------------------------------------------- the trainer

class Trainer:
    """One training run on this rank (all ranks build one and step it in lockstep)."""

    def __init__(self, args: argparse.Namespace):
        import deepspeed
        import torch
        import torch.distributed as dist
        from deepspeed.accelerator import get_accelerator
        from megatron.core import parallel_state

        from model.parallel import MegatronMpuForDeepSpeed, initialize_model_parallel
        from pipeline.training.distributed import control_group, init_distributed
        from pipeline.data.meta import check_meta_matches_tokenizer, load_meta

        self.stop_signal = StopSignal()
        self.launch = init_distributed()
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.is_rank0 = self.rank == 0
        self.accelerator = get_accelerator()
        self.control_group = control_group()

        meta = (check_meta_matches_tokenizer(args.data_prefix, args.tokenizer) if args.tokenizer
                else load_meta(args.data_prefix))
        self.config = resolve_config(args, self.world_size, meta, self.accelerator.device_name(),
                                     self.accelerator.is_fp16_supported(), self.accelerator.is_bf16_supported())
        self.config.launch = self.launch.to_dict()
        cfg = self.config
        self.run_dir = Path(cfg.runtime.save) if cfg.runtime.save else None

        initialize_model_parallel(cfg.tensor_parallel_size, cfg.training.seed)
        self.dp_rank = parallel_state.get_data_parallel_rank()
        self.dp_group = parallel_state.get_data_parallel_group()

        # The resume point and its compatibility are settled before anything heavy is built.
        self.resume = None
        if cfg.runtime.load:
            self.resume = self._find_and_check_resume_point(cfg.runtime.load)
        elif self.run_dir is not None:
            from pipeline.training.checkpoint import checkpoints_dir, complete_tags
            if complete_tags(checkpoints_dir(self.run_dir)):
                raise ConfigError(f"{self.run_dir} already holds checkpoints; pass --load {self.run_dir} to resume "
                                  "or choose another --save directory")

        from model import build_model

        model = build_model(cfg.model, init_seed=cfg.training.seed)
        self.device = torch.device(self.accelerator.device_name(), self.accelerator.current_device()) \
            if self.accelerator.device_name() != "cpu" else torch.device("cpu")
        training = cfg.training
        decay, no_decay = [], []
        for name, param in model.named_parameters():
            if not param.requires_grad:
                continue
            # No weight decay on biases and LayerNorm gains/shifts (BERT/RoBERTa convention).
            (no_decay if param.ndim < 2 else decay).append(param)
        param_groups = [{"params": decay, "weight_decay": training.weight_decay},
                        {"params": no_decay, "weight_decay": 0.0}]

        def make_scheduler(optimizer):
            return torch.optim.lr_scheduler.LambdaLR(
                optimizer, lambda i: lr_multiplier(i, training.warmup_steps, training.train_steps))

        if cfg.runtime.compile:
            from model.layers import compile_layers
            self._log(f"torch.compile: {compile_layers(model)} modules (compiled on first use)")
        self.engine, self.optimizer, _, self.lr_scheduler = deepspeed.initialize(
            model=model, model_parameters=param_groups, config=cfg.deepspeed, lr_scheduler=make_scheduler,
            mpu=MegatronMpuForDeepSpeed(), dist_init_required=False)
        self.step = 0
        self.consumed_samples = 0
        self.rng_states_to_restore = None
        if self.resume is not None:
            self._load_checkpoint()

        from pipeline.training.flops import MFU_FWD_BWD_FACTOR, training_flops

        # Model FLOPs per optimizer step for the TFLOP/s and MFU logs (forward + 2x backward).
        self.flops_per_step = float(training_flops(cfg.model, training.global_batch_size, training.seq_len,
                                                   cfg.masking.rate, mask_fraction=cfg.masking.fractions[0],
                                                   fwd_bwd_factor=MFU_FWD_BWD_FACTOR))
        self._build_data()
        self._open_logs()

    # --- resume ----------------------------------------------------------------------------------------
    def _find_and_check_resume_point(self, load_path: str):
        from pipeline.training.checkpoint import CheckpointError, config_differences, find_resume_point, read_run_config
        from pipeline.io import canonical_json_sha256

        import torch.distributed as dist

        # Rank 0 verifies the checkpoint files (sha256 of every file) once and tells the others which tag to
        # load, instead of every rank of every node re-reading the whole checkpoint.
        choice: list = [None]
        if self.is_rank0:
            try:
                choice[0] = ("ok", find_resume_point(load_path))
            except CheckpointError as error:
                choice[0] = ("error", str(error))
        dist.broadcast_object_list(choice, src=0, group=self.control_group)
        status, point = choice[0]
        if status == "error":
            raise CheckpointError(point)
        if point is None:
            self._log(f"no checkpoint under {load_path}; starting from scratch")
            return None
        for reason in point.skipped:
            self._log(f"warning: skipping damaged checkpoint: {reason}")
        saved = read_run_config(point.tag_dir)
        current = self.config.to_dict()
        diffs = config_differences(saved["config"], current, RESUMABLE_CHANGES)
        if saved.get("dataset_fingerprint") != canonical_json_sha256(self.config.dataset_meta):
            diffs.append("dataset: meta.json differs from the checkpoint's (another dataset or tokenizer)")
        if diffs:
            raise CheckpointError(f"refusing to resume from {point.tag_dir}: incompatible configuration: "
                                  + "; ".join(diffs))
        if saved["config"]["training"]["train_steps"] != current["training"]["train_steps"]:
            self._log(f"note: train_steps changed from {saved['config']['training']['train_steps']} to "
                      f"{current['training']['train_steps']}; the LR schedule follows the new horizon")
        return point

    def _load_checkpoint(self):
        import torch

        from pipeline.training.checkpoint import CheckpointError

        point = self.resume
        # DeepSpeed's ZeRO-3 universal-checkpoint loader (a re-shard, pipeline.training.universal) gives every optimizer
        # param group the hyper-parameters of the first one, so biases and LayerNorms would be weight-decayed,
        # and it puts one shared `step` tensor into every group's state, which torch's AdamW increments in place
        # once per group per step, so later groups get the wrong bias correction. Measured: losses off by 1e-3
        # two steps after a DP=2 -> DP=1 ZeRO-3 re-shard. Both are undone here; a plain resume is unaffected.
        optimizer = getattr(self.engine.optimizer, "optimizer", self.engine.optimizer)
        weight_decays = [group.get("weight_decay") for group in optimizer.param_groups]
        path, client_state = self.engine.load_checkpoint(str(point.ckpt_dir), tag=point.tag,
                                                         load_optimizer_states=True, load_lr_scheduler_states=True)
        if path is None or client_state is None:
            raise CheckpointError(f"DeepSpeed could not load {point.tag_dir}")
        if len(optimizer.param_groups) != len(weight_decays):
            raise CheckpointError(f"{point.tag_dir}: {len(optimizer.param_groups)} optimizer param groups after "
                                  f"loading, {len(weight_decays)} before")
        for group, weight_decay in zip(optimizer.param_groups, weight_decays):
            group["weight_decay"] = weight_decay
        for state in optimizer.state.values():
            if isinstance(state.get("step"), torch.Tensor):
                state["step"] = state["step"].clone()
        self.step = int(client_state["step"])
        self.consumed_samples = int(client_state["consumed_samples"])
        rng_states = client_state["rng_states"]
        if len(rng_states) != self.world_size:
            raise CheckpointError(f"{point.tag_dir}: saved by {len(rng_states)} ranks, now {self.world_size}")
        # Restored after the data loaders exist: building them may draw from the global generators.
        self.rng_states_to_restore = rng_states[self.rank]
        self._log(f"resumed from {point.tag_dir}: step {self.step}, {self.consumed_samples} samples consumed")

    # --- data ------------------------------------------------------------------------------------------
    def _fork_rng(self):
        import torch

        if self.device.type == "cpu":
            return torch.random.fork_rng(devices=[])
        return torch.random.fork_rng(devices=[self.device.index], device_type=self.device.type)

    def _build_loader(self, split: str, consumed: int, total: int | None):
        from pipeline.data.dataset import build_pretraining_dataloader
        from pipeline.data.batch import SpecialTokens

        cfg = self.config
        special = SpecialTokens(**cfg.dataset_meta["special_tokens"])
        with self._fork_rng():
            loader = build_pretraining_dataloader(
                cfg.runtime.data_prefix, split, cfg.training.seq_len, cfg.masking, special,
                cfg.model.vocab_size, cfg.training.micro_batch_size, self.dp_rank, cfg.data_parallel_size,
                consumed, cfg.runtime.num_workers, cfg.training.seed, total_samples=total)
        if cfg.runtime.num_workers > 0:
            loader.worker_init_fn = _ignore_stop_signals_in_worker(loader.worker_init_fn)
        return loader

    def _build_data(self):
        cfg = self.config
        total = cfg.training.train_steps * cfg.training.global_batch_size
        self.train_loader = self._build_loader("train", self.consumed_samples, max(total, self.consumed_samples))
        with self._fork_rng():
            self.train_iter = iter(self.train_loader)
        self.samples_per_epoch = _samples_per_epoch(self.train_loader)
        self.valid_loader = None
        if cfg.runtime.eval_interval > 0:
            eval_samples = cfg.runtime.eval_iters * cfg.training.micro_batch_size * cfg.data_parallel_size
            self.valid_loader = self._build_loader("valid", 0, eval_samples)

    # --- logging ---------------------------------------------------------------------------------------
    def _log(self, message: str):
        if self.is_rank0:
            from tqdm import tqdm

            tqdm.write(message, file=sys.stderr)

    def _open_logs(self):
        import torch.distributed as dist

        self.tb = None
        self.metrics_file = None
        self.progress = None
        if self.is_rank0:
            config_dict = self.config.to_dict()
            cfg = self.config
            self._log(f"{cfg.model.architecture} ({cfg.model.num_layers} layers, hidden {cfg.model.hidden_size}), "
                      f"masking {cfg.masking.rate:g} {cfg.masking.strategy}, seq {cfg.training.seq_len}, "
                      f"batch {cfg.training.global_batch_size} = {cfg.training.micro_batch_size} x "
                      f"{cfg.gradient_accumulation_steps} accumulation x {cfg.data_parallel_size} DP, "
                      f"TP {cfg.tensor_parallel_size}, ZeRO-{config_dict['parallel']['zero_stage']} "
                      f"{config_dict['parallel']['precision']}, lr {cfg.training.lr:g}, "
                      f"{cfg.training.train_steps} steps (launcher: {self.launch.launcher})")
            if self.run_dir is None:
                self._log("resolved config:\n" + json.dumps(config_dict, indent=2, sort_keys=True))
            else:
                self._log(f"resolved config: {self.run_dir / CONFIG_FILE}")
                self.run_dir.mkdir(parents=True, exist_ok=True)
                (self.run_dir / STOPPED_BY_SIGNAL_FILE).unlink(missing_ok=True)
                from pipeline.io import write_json_atomic
                write_json_atomic(self.run_dir / CONFIG_FILE, config_dict)
                metrics_path = self.run_dir / METRICS_FILE
                _truncate_metrics(metrics_path, self.step)
                self.metrics_file = open(metrics_path, "a", buffering=1)
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(str(self.run_dir / "tensorboard"), purge_step=self.step + 1)
            if self.config.runtime.progress_bar:
                from tqdm import tqdm
                self.progress = tqdm(total=self.config.training.train_steps, initial=self.step,
                                     desc="pre-train", dynamic_ncols=True, file=sys.stderr)
        dist.barrier()

    def _write_metrics(self, record: dict):
        if not self.is_rank0:
            return
        if self.metrics_file is not None:
            self.metrics_file.write(json.dumps(record) + "\n")
        if self.tb is not None:
            prefix = record["kind"]
            for key, value in record.items():
                if key not in ("kind", "step", "time") and isinstance(value, (int, float)) and value is not None:
                    self.tb.add_scalar(f"{prefix}/{key}", value, record["step"])

    # --- one step --------------------------------------------------------------------------------------
    def _next_batch(self):
        batch = next(self.train_iter)
        if self.device.type != "cpu":
            batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        return batch

    def _train_step(self, accum):
        """One optimizer step (all micro batches). Statistics accumulate on the device; no host sync here."""
        import torch

        # The learning rate this step uses (the scheduler moves on inside engine.step()).
        self.last_lr = float(self.engine.get_lr()[0])
        for _ in range(self.config.gradient_accumulation_steps):
            batch = self._next_batch()
            output = self.engine(batch)
            self.engine.backward(output.loss)
            self.engine.step()
            with torch.no_grad():
                accum[0] += output.loss.detach().float()
                accum[1:4] += output.loss_sum_by_kind.detach().float()
                accum[4:7] += output.count_by_kind.detach().float()
                accum[7] += 1
        self.step += 1
        self.consumed_samples += self.config.training.global_batch_size

    def _reduce_over_data_parallel(self, tensor):
        import torch.distributed as dist

        if self.config.data_parallel_size > 1:
            dist.all_reduce(tensor, group=self.dp_group)
        return tensor

    def _loss_scale(self):
        if not self.engine.fp16_enabled():
            return None
        for name in ("cur_scale", "loss_scale"):
            value = getattr(self.engine.optimizer, name, None)
            if value is not None:
                return float(value)
        return None

    # --- evaluation ------------------------------------------------------------------------------------
    def evaluate(self) -> dict:
        import torch

        sums = torch.zeros(6, dtype=torch.float64, device=self.device)
        self.engine.eval()
        with self._fork_rng(), torch.no_grad():
            for batch in self.valid_loader:
                if self.device.type != "cpu":
                    batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
                output = self.engine(batch)
                sums[0:3] += output.loss_sum_by_kind.double()
                sums[3:6] += output.count_by_kind.double()
        self.engine.train()
        totals = self._reduce_over_data_parallel(sums).tolist()
        loss_sums, counts = totals[0:3], totals[3:6]
        loss = sum(loss_sums) / max(sum(counts), 1.0)
        record = {"kind": "eval", "step": self.step, "loss": loss, "ppl": _safe_exp(loss)}
        for label, s, c in zip(KIND_LABELS, loss_sums, counts):
            record[f"loss_{label}"] = s / c if c else None
            record[f"ppl_{label}"] = _safe_exp(s / c) if c else None
        return record

    # --- checkpoints -----------------------------------------------------------------------------------
    def save_checkpoint(self) -> str:
        import torch.distributed as dist

        from pipeline.training.checkpoint import (FORMAT_VERSION, capture_rng_state, checkpoints_dir,
                                                  commit_checkpoint, partial_tag, prune_checkpoints, tag_for_step)
        from pipeline.io import canonical_json_sha256

        cfg = self.config
        ckpt_dir = checkpoints_dir(self.run_dir)
        tag = tag_for_step(self.step)
        rng_states = [None] * self.world_size
        dist.all_gather_object(rng_states, capture_rng_state(), group=self.control_group)
        config_dict = cfg.to_dict()
        run_config = {
            "format_version": FORMAT_VERSION, "step": self.step, "consumed_samples": self.consumed_samples,
            "data_epoch": self._data_epoch(), "config": config_dict,
            "tokenizer_fingerprint": cfg.dataset_meta["tokenizer"]["sha256"],
            "dataset_meta": cfg.dataset_meta, "dataset_fingerprint": canonical_json_sha256(cfg.dataset_meta),
            "world": {"world_size": self.world_size, "tensor_parallel_size": cfg.tensor_parallel_size,
                      "data_parallel_size": cfg.data_parallel_size},
        }
        client_state = dict(run_config, rng_states=rng_states)
        if self.is_rank0:
            ckpt_dir.mkdir(parents=True, exist_ok=True)
        dist.barrier()
        self.engine.save_checkpoint(str(ckpt_dir), tag=partial_tag(tag), client_state=client_state,
                                    save_latest=False)
        pause = _pause_hook(PAUSE_IN_SAVE_ENV, self.step)
        if pause and self.is_rank0:
            self._log(f"test hook: pausing {pause:.0f}s inside the save of step {self.step}")
            time.sleep(pause)
        dist.barrier()  # every rank's files are written before rank 0 makes the checkpoint visible
        if self.is_rank0:
            commit_checkpoint(ckpt_dir, tag, self.step, run_config)
            removed = prune_checkpoints(ckpt_dir, cfg.runtime.keep_last)
            self._log(f"saved checkpoint {ckpt_dir / tag}" + (f" (removed {', '.join(removed)})" if removed else ""))
        dist.barrier()
        return tag

    def _data_epoch(self) -> int | None:
        if not self.samples_per_epoch:
            return None
        return self.consumed_samples // self.samples_per_epoch

    # --- the loop --------------------------------------------------------------------------------------
    def _agreed_stop_signal(self) -> str | None:
        """The name of a stop signal any rank received, agreed by all ranks (a signal delivered to only some
        ranks still stops everyone at the same step), or None."""
        import torch
        import torch.distributed as dist

        flag = torch.tensor([self.stop_signal.received or 0], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.control_group)
        signum = int(flag.item())
        return signal.Signals(signum).name if signum else None

    def train(self) -> int:
        import torch
        import torch.distributed as dist

        from pipeline.training.checkpoint import restore_rng_state

        cfg = self.config
        training, runtime = cfg.training, cfg.runtime
        last_step = training.train_steps if runtime.stop_at_step is None else min(training.train_steps,
                                                                                  runtime.stop_at_step)
        if self.rng_states_to_restore is not None:
            restore_rng_state(self.rng_states_to_restore)
        self.engine.train()
        accum = torch.zeros(8, dtype=torch.float32, device=self.device)
        saved_at = self.step if self.resume is not None else None
        stop_reason = None
        if self.step == 0 and self.valid_loader is not None:
            # The starting point of the validation curve (the untrained model).
            record = self.evaluate()
            self._write_metrics(record)
            self._log(_eval_line(record))
        window_start, window_steps = time.perf_counter(), 0
        while self.step < last_step:
            self._train_step(accum)
            window_steps += 1
            if self.step % runtime.log_interval == 0 or self.step == last_step:
                values = self._reduce_over_data_parallel(accum.clone()).tolist()
                elapsed = time.perf_counter() - window_start
                record = self._train_record(values, window_steps, elapsed)
                self._write_metrics(record)
                if self.progress is not None:
                    self.progress.set_postfix_str(_progress_text(record), refresh=False)
                elif self.is_rank0:
                    self._log(_progress_line(record, training.train_steps))
                accum.zero_()
                window_start, window_steps = time.perf_counter(), 0
            if self.progress is not None:
                self.progress.update(1)
            side_work_start = time.perf_counter()
            if self.valid_loader is not None and runtime.eval_interval and self.step % runtime.eval_interval == 0:
                record = self.evaluate()
                self._write_metrics(record)
                self._log(_eval_line(record))
            if self.run_dir is not None and self.step % runtime.save_interval == 0:
                self.save_checkpoint()
                saved_at = self.step
            window_start += time.perf_counter() - side_work_start  # throughput counts training time only
            pause_until = time.monotonic() + _pause_hook(PAUSE_AFTER_STEP_ENV, self.step)
            while time.monotonic() < pause_until and not self.stop_signal.received:
                time.sleep(0.05)
            stop_reason = self._agreed_stop_signal()
            if stop_reason is not None:
                break
        if self.run_dir is not None and saved_at != self.step:
            self.save_checkpoint()
        if self.progress is not None:
            self.progress.close()
        if stop_reason is not None:
            message = f"stopped by {stop_reason} at step {self.step}"
            if self.is_rank0 and self.run_dir is not None:
                from pipeline.training.checkpoint import tag_for_step
                from pipeline.io import write_json_atomic
                write_json_atomic(self.run_dir / STOPPED_BY_SIGNAL_FILE,
                                  {"signal": stop_reason, "step": self.step, "checkpoint": tag_for_step(self.step)})
            self._log(message + ("; checkpoint saved, resume with --load" if self.run_dir else ""))
        else:
            self._log(f"finished at step {self.step}")
        if self.tb is not None:
            self.tb.close()
        if self.metrics_file is not None:
            self.metrics_file.close()
        dist.barrier()
        return 0

    def _train_record(self, values: list[float], steps: int, elapsed: float) -> dict:
        cfg = self.config
        micro_steps = max(values[7], 1.0)
        record = {"kind": "train", "step": self.step, "loss": values[0] / micro_steps,
                  "lr": self.last_lr}
        for i, label in enumerate(KIND_LABELS):
            count = values[4 + i]
            record[f"loss_{label}"] = values[1 + i] / count if count else None
        record["loss_scale"] = self._loss_scale()
        samples = steps * cfg.training.global_batch_size
        record["samples_per_s"] = samples / elapsed if elapsed > 0 else None
        record["tokens_per_s"] = samples * cfg.training.seq_len / elapsed if elapsed > 0 else None
        tflops = self.flops_per_step * steps / elapsed / self.world_size / 1e12 if elapsed > 0 else None
        record["tflops_per_device"] = tflops
        record["mfu"] = tflops / cfg.runtime.peak_tflops if (tflops and cfg.runtime.peak_tflops) else None
        record["consumed_samples"] = self.consumed_samples
        record["skipped_steps"] = int(getattr(self.engine, "skipped_steps", 0))
        record["time"] = time.time()
        return record


def _samples_per_epoch(loader) -> int | None:
    dataset = getattr(loader, "dataset", None)
    packed = getattr(dataset, "packed", None)
    try:
        return len(packed) if packed is not None else None
    except TypeError:
        return None


def _safe_exp(x: float) -> float:
    return math.exp(min(x, 700.0))


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _progress_text(record: dict) -> str:
    parts = [f"loss={record['loss']:.4f}", f"lr={record['lr']:.2e}"]
    if record.get("loss_scale") is not None:
        parts.append(f"scale={record['loss_scale']:.0f}")
    parts += [f"{_fmt(record['samples_per_s'], '.1f')} samples/s", f"{_fmt(record['tokens_per_s'], '.0f')} tok/s",
              f"{_fmt(record['tflops_per_device'], '.3g')} TFLOP/s"]
    if record.get("mfu") is not None:
        parts.append(f"MFU={100 * record['mfu']:.1f}%")
    return " ".join(parts)


def _progress_line(record: dict, total: int) -> str:
    return f"step {record['step']}/{total} " + _progress_text(record)


def _eval_line(record: dict) -> str:
    kinds = " ".join(f"ppl_{k}={_fmt(record.get(f'ppl_{k}'), '.2f')}" for k in KIND_LABELS)
    return f"validation step {record['step']}: loss={record['loss']:.4f} ppl={record['ppl']:.2f} {kinds}"


def _truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop records written after the checkpoint we resume from (the steps are re-run)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            continue  # a line cut by a crash
    from pipeline.io import write_text_atomic
    write_text_atomic(path, "".join(line + "\n" for line in kept))


def main(argv: Sequence[str] | None = None) -> int:
    from pipeline.training.checkpoint import CheckpointError
    from pipeline.errors import DataError

    args = build_parser().parse_args(argv)
    try:
        trainer = Trainer(args)
        return trainer.train()
    except (ConfigError, CheckpointError, DataError) as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        return 1
