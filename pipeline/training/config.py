"""What a pre-training run is: its configuration dataclasses, the paper recipes, the DeepSpeed JSON merge and
the command line generated from the dataclasses.

Two kinds of settings, kept apart (as in Cramming):

* hyper-parameters -- the model (a ``ModelConfig`` preset plus overrides), the masking (``MaskingConfig``) and
  the optimisation (``TrainingConfig``) -- come from the command line or a recipe (``--recipe base`` is the
  paper's Table 4 3MLself-base recipe, ``ds_configs/recipe_*.json``);
* implementation settings -- ZeRO stage, precision, communication buckets, the micro-batch size, the parallel
  layout -- come from the DeepSpeed JSON (``--deepspeed_config ds_configs/zero2_bf16.json``) and the
  ``RuntimeConfig`` / ``ParallelConfig`` options. Batch sizes, learning rate, Adam and clipping are written
  *into* that JSON from ``TrainingConfig``; a JSON that sets them itself is refused, so there is one source.

Each option's help text is declared once, in the ``metadata["help"]`` of its dataclass field; ``build_parser``
turns the fields into ``run_pretrain.py``'s command line. ``ResolvedConfig.to_dict`` is what is logged, written
to ``RUN_DIR/config.json`` and saved in every checkpoint; ``ResolvedConfig.from_dict`` rebuilds a run's
configuration from it (re-sharding), without going back through the command line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from pipeline.errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parents[2]
DS_CONFIG_DIR = REPO_ROOT / "ds_configs"
DEFAULT_DS_CONFIG = "zero2_fp32.json"
# RuntimeConfig.compile: nothing, each layer (model.layers.compile_layers), the whole model (engine.compile()).
COMPILE_MODES = ("none", "layers", "model")


def _help(text: str, **cli) -> dict:
    """Field metadata: the option's help text (its one documentation) plus argparse details for ``build_parser``."""
    return {"help": text, **cli}


# ------------------------------------------------------------------------------------------- dataclasses

@dataclass
class TrainingConfig:
    """Optimisation hyper-parameters (paper Table 4 for the recipes)."""

    seq_len: int = field(default=128, metadata=_help("Tokens per packed training sequence."))
    global_batch_size: int = field(default=32, metadata=_help(
        "Sequences per optimizer step over all data-parallel ranks (= micro batch x accumulation x DP size)."))
    micro_batch_size: int = field(default=8, metadata=_help(
        "Sequences per forward/backward on one data-parallel rank: a memory-bound implementation choice that a "
        "resume may change (the optimizer step sums the same global batch)."))
    train_steps: int = field(default=1000, metadata=_help(
        "Optimizer steps; the linear LR decay reaches 0 at this step."))
    lr: float = field(default=1e-3, metadata=_help("Peak learning rate, reached at the end of the warm-up."))
    warmup_proportion: float = field(default=0.06, metadata=_help(
        "Fraction of train_steps with a linear warm-up from 0 to lr; then linear decay to 0."))
    weight_decay: float = field(default=0.01, metadata=_help(
        "AdamW decoupled weight decay (not applied to biases and LayerNorm parameters)."))
    adam_beta1: float = field(default=0.9, metadata=_help("Adam beta1."))
    adam_beta2: float = field(default=0.98, metadata=_help("Adam beta2."))
    adam_eps: float = field(default=1e-6, metadata=_help("Adam epsilon."))
    grad_clip: float = field(default=0.0, metadata=_help(
        "Global gradient-norm clipping threshold; 0 disables it (paper: 0, or 1.0 if gradients explode)."))
    seed: int = field(default=1234, metadata=_help("Seed of weight initialisation, dropout and data order."))

    def __post_init__(self):
        for name in ("seq_len", "global_batch_size", "micro_batch_size", "train_steps", "seed"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < (0 if name == "seed" else 1):
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
class ParallelConfig:
    """How the ranks are laid out; the tensor-parallel size is the one place that number lives."""

    tensor_parallel_size: int = field(default=1, metadata=_help(
        "Megatron tensor-parallel degree; the remaining ranks are data-parallel."))
    data_parallel_size: int = field(default=1, metadata=_help(
        "World size / tensor-parallel size (derived from the launch).", cli=False))

    def __post_init__(self):
        for name in ("tensor_parallel_size", "data_parallel_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")

    @classmethod
    def for_world(cls, tensor_parallel_size: int, world_size: int) -> "ParallelConfig":
        if tensor_parallel_size < 1 or world_size % tensor_parallel_size:
            raise ConfigError(f"tensor_parallel_size {tensor_parallel_size} does not divide the world size "
                              f"{world_size}")
        return cls(tensor_parallel_size, world_size // tensor_parallel_size)


@dataclass
class RuntimeConfig:
    """Where input and output go, how often things happen and how the step is implemented; free to change when
    resuming (``RESUMABLE_CHANGES`` in ``pipeline.training.checkpoint``)."""

    data_prefix: str = field(default="", metadata=_help(
        "Prefix P written by python -m pipeline preprocess (P_train.*, P_valid.*, P.meta.json), or a weighted blend "
        "WEIGHT P WEIGHT P ... (megatron-core's convention, e.g. 0.5 wiki 0.3 books 0.2 web; pipeline.data.blend): "
        "stored as one space-separated string.", required=True, nargs="+", group="data"))
    index_builder: str = field(default="node", metadata=_help(
        "Which rank builds the packing/shuffle/blend indices (memory-mapped .npy files next to the data, or in "
        "--index-dir) while the others wait at a barrier: 'node' = local rank 0 of every node (works whether the "
        "data sits on node-local disks or a shared filesystem, where the nodes write identical files atomically); "
        "'global' = rank 0 only (one build in all; only when every node sees the same files).",
        choices=("node", "global"), group="data"))
    index_dir: str | None = field(default=None, metadata=_help(
        "Directory for the data indices (default: next to the data; give one when that is read-only).",
        group="data"))
    tokenizer: str | None = field(default=None, metadata=_help(
        "tokenizer.json (or its directory); checked against the dataset's meta.json.", group="data"))
    num_workers: int = field(default=2, metadata=_help("DataLoader worker processes per rank.", group="data"))
    deepspeed_config: str = field(default=DEFAULT_DS_CONFIG, metadata=_help(
        "Implementation settings JSON (ds_configs/*.json, or a path); a recipe may name one.",
        flags=("--deepspeed_config", "--deepspeed-config"), group="DeepSpeed", from_recipe=True))
    compile: str = field(default="none", metadata=_help(
        "What torch.compile compiles (static shapes): 'layers' (a bare --compile) = each Transformer and "
        "prediction layer (model.layers.compile_layers; GPU: ~1 min to compile, then ~20% faster steps); 'model' "
        "= the whole forward -- embeddings, encoder, 3ML's gather/scatter and decoder, loss -- through DeepSpeed's "
        "engine.compile() (ZeRO 0-2 at TP=1, not with DeepCompile; evaluation compiles once more). Parameter "
        "names and checkpoints do not depend on it: a run resumes under any mode (bitwise under the same one: "
        "compiled dropout draws from inductor's generator). On a V100 (sm_70) it "
        "compiles fp16 graphs whose matmuls stay cuBLAS (Triton has no Volta tensor-core path).",
        choices=COMPILE_MODES, nargs="?", const="layers", group="DeepSpeed"))
    save: str | None = field(default=None, metadata=_help(
        "Run directory: checkpoints/, metrics.jsonl, tensorboard/, config.json.", group="checkpoints and logging"))
    load: str | None = field(default=None, metadata=_help(
        "Resume from a run directory, its checkpoints/ directory or one checkpoint tag directory; an empty or "
        "missing directory starts from scratch.", group="checkpoints and logging"))
    save_interval: int = field(default=1000, metadata=_help("Save a checkpoint every N steps.",
                                                            group="checkpoints and logging"))
    keep_last: int = field(default=3, metadata=_help("Keep the newest K checkpoints (0: keep all).",
                                                     group="checkpoints and logging"))
    checkpoint_sha256: bool = field(default=False, metadata=_help(
        "Also record every checkpoint file's sha256 in its manifest (reads every byte on rank 0 while all ranks "
        "wait; by default the manifest records sizes and the load checks the CRC-32 torch stores per record).",
        group="checkpoints and logging"))
    log_interval: int = field(default=10, metadata=_help("Log metrics every N steps.",
                                                         group="checkpoints and logging"))
    eval_interval: int = field(default=1000, metadata=_help(
        "Validate every N steps and at the last step of training, as Megatron does (0: never).",
        group="checkpoints and logging"))
    eval_iters: int = field(default=10, metadata=_help("Validation micro batches per data-parallel rank.",
                                                       group="checkpoints and logging"))
    stop_at_step: int | None = field(default=None, metadata=_help(
        "Save and exit after this step (the LR schedule still spans --train-steps).",
        group="checkpoints and logging"))
    peak_tflops: float | None = field(default=None, metadata=_help(
        "Peak TFLOP/s of one device for MFU (e.g. 312 for A100 bf16, 125 for V100 fp16).",
        group="checkpoints and logging"))
    progress_bar: bool = field(default=True, metadata=_help(
        "Plain log lines instead of a tqdm bar.", flags=("--no-progress-bar",), action="store_false",
        group="checkpoints and logging"))

    def __post_init__(self):
        for name in ("save_interval", "log_interval", "eval_iters"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1")
        for name in ("eval_interval", "keep_last", "num_workers"):
            if getattr(self, name) < 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 0")
        if self.stop_at_step is not None and self.stop_at_step < 1:
            raise ConfigError("--stop-at-step must be >= 1")
        if self.peak_tflops is not None and not self.peak_tflops > 0:
            raise ConfigError("--peak-tflops must be > 0")
        if self.index_builder not in ("node", "global"):
            raise ConfigError(f"--index-builder must be 'node' or 'global', got {self.index_builder!r}")
        if isinstance(self.compile, bool):  # configurations saved before the modes stored a flag: True = layers
            self.compile = "layers" if self.compile else "none"
        if self.compile not in COMPILE_MODES:
            raise ConfigError(f"--compile must be one of {', '.join(COMPILE_MODES)}, got {self.compile!r}")


@dataclass
class ModelChoice:
    """The command line's model and masking hyper-parameters; each unset option falls back to the recipe, then
    to the default named in its help."""

    recipe: str | None = field(default=None, metadata=_help(
        "Paper recipe 'base' (3MLself-base, Table 4) or 'large', or a recipe JSON path.", group="recipe and model"))
    architecture: str | None = field(default=None, metadata=_help(
        "Model architecture [default: 3ml-self].", choices=("mlm", "3ml-self", "3ml-cross"),
        group="recipe and model"))
    model_preset: str | None = field(default=None, metadata=_help(
        "Model size preset: tiny, mini, base, large [default: tiny].", group="recipe and model"))
    model_set: list = field(default_factory=list, metadata=_help(
        "Override a ModelConfig field, repeatable (e.g. --model-set hidden_size=256 --model-set pre_ln=true).",
        action="append", metavar="KEY=VALUE", element_type=str, group="recipe and model"))
    masking_rate: float | None = field(default=None, metadata=_help(
        "Fraction of tokens corrupted [default: 0.4].", group="masking"))
    masking_strategy: str | None = field(default=None, metadata=_help(
        "Percent <mask>-random-unchanged [default: 80-10-10].", group="masking"))
    masking_seed: int | None = field(default=None, metadata=_help(
        "Seed of the corruption [default: --seed].", group="masking"))


@dataclass
class LauncherOptions:
    """Options the launchers pass that the run itself does not use."""

    local_rank: int | None = field(default=None, metadata=_help(
        "Set by the deepspeed launcher; LOCAL_RANK from the environment is used.", flags=("--local_rank",
                                                                                          "--local-rank")))
    deepspeed: bool = field(default=False, metadata=_help(
        "Accepted for launcher compatibility; always on.", action="store_true"))


# ---------------------------------------------------------------------------------------------- command line

class _HelpFormatter(argparse.HelpFormatter):
    """Shows a default only where there is one: hyper-parameters default to None so a recipe can fill them,
    and their help text states the dataclass default itself."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        shown = not (default is None or isinstance(default, bool) or default in ([], argparse.SUPPRESS))
        if shown and "default" not in text:
            text += " [default: %(default)s]"
        return text


def _add_fields(parser: argparse.ArgumentParser, cls, default_group: str, defaults_from_recipe: bool) -> None:
    """One option per field of dataclass ``cls`` (``metadata["cli"] is False`` skips it), help from the metadata.
    ``defaults_from_recipe``: the option defaults to None (so a recipe can fill it) and the help names the
    dataclass default."""
    hints = typing.get_type_hints(cls)
    groups: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        meta = dict(f.metadata)
        if meta.pop("cli", True) is False:
            continue
        group_name = meta.pop("group", default_group)
        group = groups.get(group_name) or groups.setdefault(group_name, parser.add_argument_group(group_name))
        flags = meta.pop("flags", ("--" + f.name.replace("_", "-"),))
        text = meta.pop("help").replace("%", "%%")  # argparse formats help with %
        element_type = meta.pop("element_type", None)
        from_recipe = meta.pop("from_recipe", defaults_from_recipe)
        kwargs = dict(dest=f.name, **meta)
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if hints[f.name] is bool and "action" not in kwargs:
            kwargs["action"] = "store_true" if default is False else "store_false"
        if kwargs.get("action") in ("store_true", "store_false"):
            kwargs["default"] = default
        else:
            kind = element_type or next((t for t in typing.get_args(hints[f.name]) if t is not type(None)),
                                        hints[f.name])
            kwargs["type"] = kind if kind in (int, float) else str
            if from_recipe:
                kwargs["default"] = None
                text += f" [default: {default}]"
            elif not kwargs.get("required"):
                kwargs["default"] = default
        group.add_argument(*flags, help=text, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(  # prog from argv[0]: run_pretrain.py, or python -m pipeline train
        description="Pre-train MLM / 3MLself / 3MLcross with DeepSpeed (ZeRO 0-3, tensor parallelism, fp16/bf16). "
                    "Hyper-parameters: a recipe and/or the options below (explicit options win over the recipe). "
                    "Implementation settings: --deepspeed_config.",
        formatter_class=_HelpFormatter)
    _add_fields(parser, ModelChoice, "recipe and model", defaults_from_recipe=False)
    _add_fields(parser, TrainingConfig, "optimisation (TrainingConfig)", defaults_from_recipe=True)
    _add_fields(parser, ParallelConfig, "parallelism", defaults_from_recipe=False)
    _add_fields(parser, RuntimeConfig, "run", defaults_from_recipe=False)
    _add_fields(parser, LauncherOptions, "launcher", defaults_from_recipe=False)
    return parser


def _values(args: argparse.Namespace, cls) -> dict:
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}


# ---------------------------------------------------------------------------------------- recipes and JSON

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
    except (ValueError, OSError) as error:
        raise ConfigError(f"{path}: invalid JSON ({error})") from None
    if not isinstance(recipe, dict):
        raise ConfigError(f"{path}: a recipe is a JSON object")
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


# Keys of the DeepSpeed JSON that TrainingConfig writes (a JSON that sets them itself is refused).
HYPER_PARAMETER_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                        "gradient_clipping", "scheduler")
OPTIMIZER_HYPER_PARAMETERS = ("lr", "betas", "eps", "weight_decay")


def read_deepspeed_json(path: Path) -> dict:
    """The implementation settings of a DeepSpeed JSON (``_comment`` keys dropped), hyper-parameters refused."""
    try:
        ds = json.loads(Path(path).read_text())
    except (ValueError, OSError) as error:
        raise ConfigError(f"{path}: invalid JSON ({error})") from None
    if not isinstance(ds, dict):
        raise ConfigError(f"{path}: a DeepSpeed config is a JSON object")
    ds = {k: v for k, v in ds.items() if not k.startswith("_")}
    clashes = [k for k in HYPER_PARAMETER_KEYS if k in ds]
    params = ds.get("optimizer", {}).get("params", {})
    clashes += [f"optimizer.params.{k}" for k in OPTIMIZER_HYPER_PARAMETERS if k in params]
    if clashes:
        raise ConfigError(f"{path} sets {', '.join(clashes)}: these are training hyper-parameters, given on the "
                          "command line (TrainingConfig); remove them from the DeepSpeed config")
    return ds


def implementation_settings(ds_config: dict) -> dict:
    """A merged DeepSpeed config with the hyper-parameters ``merge_hyper_parameters`` wrote taken out again."""
    ds = json.loads(json.dumps(ds_config))
    for key in HYPER_PARAMETER_KEYS:
        ds.pop(key, None)
    params = ds.get("optimizer", {}).get("params", {})
    for key in OPTIMIZER_HYPER_PARAMETERS:
        params.pop(key, None)
    return ds


def _deepspeed_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("deepspeed")
    except PackageNotFoundError:
        return "(not installed)"


def merge_hyper_parameters(settings: dict, training: TrainingConfig, data_parallel_size: int, source: str,
                           accelerator_name: str, fp16_supported: bool, bf16_supported: bool) -> dict:
    """The implementation ``settings`` (from ``source``) with the hyper-parameters of ``training`` written in."""
    ds = json.loads(json.dumps(settings))
    optimizer = ds.setdefault("optimizer", {"type": "AdamW", "params": {}})
    params = optimizer.setdefault("params", {})
    if str(optimizer.get("type", "")).lower() not in ("adamw", "adam"):
        raise ConfigError(f"{source}: optimizer type must be AdamW (got {optimizer.get('type')!r})")
    if ds.get("fp16", {}).get("enabled") and ds.get("bf16", {}).get("enabled"):
        raise ConfigError(f"{source}: fp16 and bf16 are both enabled")
    if ds.get("torch_autocast", {}).get("enabled") and (ds.get("fp16", {}).get("enabled")
                                                        or ds.get("bf16", {}).get("enabled")):
        raise ConfigError(f"{source}: torch_autocast keeps fp32 parameters; disable its fp16/bf16 section")
    if ds.get("fp16", {}).get("enabled") and not fp16_supported:
        raise ConfigError(f"{source}: fp16 is not supported by the {accelerator_name} accelerator; use a bf16 or "
                          "fp32 config")
    if ds.get("bf16", {}).get("enabled") and not bf16_supported:
        raise ConfigError(f"{source}: bf16 is not supported by the {accelerator_name} accelerator")
    if ds.get("compile", {}).get("deepcompile") and accelerator_name != "cuda":
        # DeepSpeed 0.19.8 registers its DeepCompile passes only when is_deepcompile_supported() (torch >= 2.6
        # and a CUDA accelerator), and engine.compile() loads its DeepCompileBuilder op: a CUDA extension.
        raise ConfigError(f"{source}: DeepCompile (compile.deepcompile) runs on CUDA only in DeepSpeed "
                          f"{_deepspeed_version()}, not on the {accelerator_name} accelerator")
    zero = ds.get("zero_optimization", {})
    if zero.get("compute_grad_norm") is False and (training.grad_clip > 0
                                                   or int(zero.get("stage", 0)) not in (1, 2)):
        raise ConfigError(f"{source}: zero_optimization.compute_grad_norm=false needs ZeRO stage 1 or 2 and "
                          f"--grad-clip 0 (got stage {zero.get('stage', 0)}, grad_clip {training.grad_clip})")
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


def check_compile_mode(mode: str, ds_config: dict, source: str, tensor_parallel_size: int = 1) -> None:
    """Refuses, in one line, a ``--compile`` mode that ``ds_config`` (from ``source``) or the tensor-parallel
    size cannot run with."""
    if mode != "none" and ds_config.get("compile", {}).get("deepcompile"):
        # DeepCompile is engine.compile() with DeepSpeed's own backend: it compiles the whole model already.
        raise ConfigError(f"{source}: --compile {mode} and DeepCompile (compile.deepcompile) both compile the "
                          "model: choose one")
    if mode == "model" and int(ds_config.get("zero_optimization", {}).get("stage", 0)) == 3:
        # ZeRO-3 gathers each parameter in a module hook and frees it after; the whole-model graph traces the
        # freed (empty) parameters (DeepSpeed 0.19.8's engine.compile() without DeepCompile).
        raise ConfigError(f"{source}: --compile model does not run with ZeRO stage 3 (its graph sees the "
                          "partitioned, empty parameters); use --compile layers, or ZeRO stage 0-2")
    if mode == "model" and tensor_parallel_size > 1:
        # Measured on CPU at TP=2 (tiny 3MLself): dynamo breaks the graph at each of megatron-core's all_reduce
        # calls (async_op=True: not traceable) and warnings, 26 graphs instead of one, and the linear layers'
        # forward reaches dynamo's recompile limit (8) and runs eager. The losses stay eager's; the point is lost.
        raise ConfigError(f"--compile model at --tensor-parallel-size {tensor_parallel_size}: megatron-core's "
                          "tensor-parallel collectives break the whole-model graph into pieces; use --compile "
                          "layers")


def build_deepspeed_config(path: Path, training: TrainingConfig, data_parallel_size: int,
                           accelerator_name: str, fp16_supported: bool, bf16_supported: bool) -> dict:
    """The implementation settings of ``path`` with the hyper-parameters of ``training`` written in."""
    return merge_hyper_parameters(read_deepspeed_json(path), training, data_parallel_size, str(path),
                                  accelerator_name, fp16_supported, bf16_supported)


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


# ------------------------------------------------------------------------------------------ resolved config

@dataclass
class ResolvedConfig:
    """Everything a run is: the single source every component reads, logged and saved with checkpoints."""

    model: Any  # model.config.ModelConfig
    masking: Any  # pipeline.data.masking.MaskingConfig
    training: TrainingConfig
    parallel: ParallelConfig
    runtime: RuntimeConfig
    deepspeed: dict  # the merged DeepSpeed config (implementation settings + hyper-parameters)
    recipe: str | None = None
    dataset_meta: dict = field(default_factory=dict)
    launch: dict = field(default_factory=dict)

    @property
    def tensor_parallel_size(self) -> int:
        return self.parallel.tensor_parallel_size

    @property
    def data_parallel_size(self) -> int:
        return self.parallel.data_parallel_size

    @property
    def gradient_accumulation_steps(self) -> int:
        return self.training.gradient_accumulation_steps(self.data_parallel_size)

    @property
    def zero_stage(self) -> int:
        return int(self.deepspeed.get("zero_optimization", {}).get("stage", 0))

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
                         "zero_stage": self.zero_stage,
                         "precision": precision_of(self.deepspeed)},
            "data": {"prefix": self.runtime.data_prefix, "tokenizer": self.runtime.tokenizer,
                     "vocab_size": self.dataset_meta.get("tokenizer", {}).get("vocab_size")},
            "deepspeed": {"config_file": self.runtime.deepspeed_config, "config": self.deepspeed},
            "recipe": self.recipe,
            "runtime": dataclasses.asdict(self.runtime),
            "launch": self.launch,
        }

    @classmethod
    def from_dict(cls, saved: dict, world_size: int, dataset_meta: dict, accelerator_name: str,
                  fp16_supported: bool, bf16_supported: bool, **runtime_changes) -> "ResolvedConfig":
        """The configuration ``to_dict`` saved, laid out for ``world_size`` ranks (the TP size is kept, the DP
        size and gradient accumulation follow the world): what a re-shard builds its engine from."""
        from model.config import ModelConfig
        from pipeline.data.masking import MaskingConfig

        # Checkpoints written before ParallelConfig existed carried the TP size in the training section too.
        training_values = {k: v for k, v in saved["training"].items() if k != "tensor_parallel_size"}
        training = TrainingConfig(**training_values)
        parallel = ParallelConfig.for_world(int(saved["parallel"]["tensor_parallel_size"]), world_size)
        known_runtime = {f.name for f in dataclasses.fields(RuntimeConfig)}
        runtime = RuntimeConfig(**{**{k: v for k, v in saved["runtime"].items() if k in known_runtime},
                                   **runtime_changes})
        settings = implementation_settings(saved["deepspeed"]["config"])
        deepspeed = merge_hyper_parameters(settings, training, parallel.data_parallel_size,
                                           saved["deepspeed"]["config_file"], accelerator_name, fp16_supported,
                                           bf16_supported)
        return cls(model=ModelConfig.from_dict(saved["model"]), masking=MaskingConfig(**saved["masking"]),
                   training=training, parallel=parallel, runtime=runtime, deepspeed=deepspeed,
                   recipe=saved.get("recipe"), dataset_meta=dataset_meta)


def resolve_config(args: argparse.Namespace, world_size: int, dataset_meta: dict,
                   accelerator_name: str, fp16_supported: bool, bf16_supported: bool) -> ResolvedConfig:
    """Explicit options > recipe > defaults, validated (no process group needed: ``run_pretrain.py`` calls it
    before the distributed start-up, so a bad setting is reported at once)."""
    from model.config import ModelConfig
    from pipeline.data.masking import MaskingConfig

    recipe = load_recipe(args.recipe) if args.recipe else {}
    recipe_training = recipe.get("training", {})
    unknown = set(recipe_training) - {f.name for f in dataclasses.fields(TrainingConfig)}
    if unknown:
        raise ConfigError(f"{recipe['_path']}: unknown training keys {sorted(unknown)}")
    training_values = dict(recipe_training)
    training_values.update({k: v for k, v in _values(args, TrainingConfig).items() if v is not None})
    training = TrainingConfig(**training_values)
    parallel = ParallelConfig.for_world(args.tensor_parallel_size, world_size)
    tp, dp = parallel.tensor_parallel_size, parallel.data_parallel_size
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

    check_compile_mode(args.compile, ds_config, str(ds_path), tp)

    data_prefix = args.data_prefix if isinstance(args.data_prefix, str) else " ".join(map(str, args.data_prefix))
    runtime = RuntimeConfig(**dict(_values(args, RuntimeConfig), data_prefix=data_prefix,
                                   deepspeed_config=str(ds_path)))
    return ResolvedConfig(model=model_config, masking=masking, training=training, parallel=parallel,
                          runtime=runtime, deepspeed=ds_config, recipe=recipe.get("_path"),
                          dataset_meta=dataset_meta)
