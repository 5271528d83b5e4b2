"""The one builder of the DeepSpeed engine: parameter groups, the LR schedule and ``deepspeed.initialize``.

Training (``pipeline.training.trainer``), re-sharding (``pipeline.training.universal``) and the throughput
benchmark (``bench/throughput.py``) all call ``build_engine``, so the engine a benchmark measures and the one a
re-shard fills with Adam state are the one training steps: the same parameter groups in the same order (a
re-shard maps optimizer state onto them by position), the same weight decay per parameter, the same schedule.

DeepSpeed is imported inside the functions: fine-tuning imports ``pipeline.training.schedule`` only, and the
configuration can be validated without it.
"""

from __future__ import annotations

from typing import Any

from pipeline.training.config import TrainingConfig, check_compile_mode
from pipeline.training.schedule import lr_multiplier


def decays_weight(name: str, param) -> bool:
    """Weight decay on matrices only: not on biases and LayerNorm gains/shifts (the BERT/RoBERTa convention)."""
    return param.ndim >= 2


def parameter_groups(model, weight_decay: float) -> list[dict]:
    """The optimizer's parameter groups: [decayed, not decayed], each in ``named_parameters`` order."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (decay if decays_weight(name, param) else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def weight_decay_by_name(engine, model) -> dict[str, float]:
    """``{parameter name: weight decay}`` that ``engine``'s optimizer applies. ZeRO-1/2 flatten each group's
    tensors; DeepSpeed keeps the original parameters per group in ``bit16_groups`` (``fp16_groups`` at
    ZeRO-3), in the order of the torch optimizer's groups."""
    by_id = {id(p): n for n, p in model.named_parameters()}
    groups = base_optimizer(engine).param_groups
    wrapper = engine.optimizer
    param_lists = (getattr(wrapper, "bit16_groups", None) or getattr(wrapper, "fp16_groups", None)
                   or [group["params"] for group in groups])
    result = {}
    for params, group in zip(param_lists, groups):
        for param in params:
            if id(param) in by_id:
                result[by_id[id(param)]] = float(group.get("weight_decay", 0.0))
    return result


def lr_scheduler_factory(training: TrainingConfig):
    """The ``lr_scheduler`` callable ``deepspeed.initialize`` takes: Table 4's warm-up and linear decay."""
    def make(optimizer):
        import torch

        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda i: lr_multiplier(i, training.warmup_steps, training.train_steps))
    return make


def build_engine(model, training: TrainingConfig, deepspeed_config: dict, *, compile: str = "none",
                 load_universal: bool = False, log=None) -> Any:
    """The DeepSpeed engine that trains ``model`` with ``training``'s hyper-parameters and the merged
    ``deepspeed_config`` (``pipeline.training.config.build_deepspeed_config``). Needs megatron-core's parallel
    state initialised (``model.parallel.initialize_model_parallel``).

    ``compile`` (``RuntimeConfig.compile``): ``"layers"`` compiles the Transformer and prediction layers before
    DeepSpeed wraps the model; ``"model"`` compiles the whole forward after ``deepspeed.initialize`` through
    DeepSpeed's ``engine.compile()``, which compiles the wrapped module in place (``nn.Module.compile``): the
    parameters, their names and ``state_dict`` stay those of the eager model (no ``_orig_mod.`` prefix), so
    checkpoints are interchangeable between the modes. ``load_universal``: this engine loads a DeepSpeed
    universal checkpoint (re-sharding); the saved configuration stays native. A config with ``"compile":
    {"deepcompile": true}`` (ZeRO 1-3, CUDA only; checked by ``merge_hyper_parameters``) gets
    ``engine.compile()`` with DeepSpeed's DeepCompile backend: the whole model compiled, the ZeRO collectives
    inside the graph instead of per-parameter gradient hooks."""
    import deepspeed

    from model.parallel import MegatronMpuForDeepSpeed

    from megatron.core import parallel_state

    check_compile_mode(compile, deepspeed_config, "the DeepSpeed config",
                       parallel_state.get_tensor_model_parallel_world_size())
    if compile == "layers":
        from model.layers import compile_layers

        count = compile_layers(model)
        if log is not None:
            log(f"torch.compile: {count} modules (compiled on first use)")
    config = dict(deepspeed_config, checkpoint={"load_universal": True}) if load_universal else deepspeed_config
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=parameter_groups(model, training.weight_decay), config=config,
        lr_scheduler=lr_scheduler_factory(training), mpu=MegatronMpuForDeepSpeed(), dist_init_required=False)
    if compile == "model":
        # Static shapes: every training micro batch has one shape (pipeline.data.masking); evaluation (eval
        # mode, no_grad) and an evaluation batch of another size each compile once more.
        engine.compile(compile_kwargs={"dynamic": False})
        if log is not None:
            log("torch.compile: the whole model (engine.compile(), compiled on first use)")
    elif deepspeed_config.get("compile", {}).get("deepcompile"):
        engine.compile()
    return engine


def base_optimizer(engine):
    """The torch optimizer inside DeepSpeed's ZeRO wrapper (or the engine's optimizer itself)."""
    return getattr(engine.optimizer, "optimizer", engine.optimizer)
