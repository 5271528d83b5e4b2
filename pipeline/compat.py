"""Every write into a pinned library's private internals, in one place, each behind a check that fails loudly.

The project pins megatron-core 0.16.1 and DeepSpeed 0.19.8 (requirements.txt). The few places where it has to
reach into their internals are here, and each first checks that the internal it writes still exists with the
shape it expects; an upgrade that changes one stops with one line naming the library, its version and what
changed (``CompatError``), instead of silently doing nothing or something else.

This module is a leaf: it imports no project module (``model/`` may import it; tests/test_layering.py).

* megatron-core: ``install_megatron_rng_tracker`` registers our CPU RNG tracker as the one
  ``megatron.core.tensor_parallel.random.get_cuda_rng_tracker()`` returns (the CUDA tracker needs a GPU);
  ``megatron_rng_tracker_names`` reads the stream names it uses.
* DeepSpeed: ``disable_universal_checkpoint_loading`` turns an engine that loaded a universal checkpoint back
  into one that saves natively; ``undo_zero3_universal_loader_changes`` corrects what DeepSpeed's ZeRO-3
  universal loader does to the optimizer's parameter groups and Adam ``step`` tensors.
"""

from __future__ import annotations


class CompatError(RuntimeError):
    """A pinned library no longer has the internal this project writes; ``str()`` is one line."""


def _version(distribution: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(distribution)
    except PackageNotFoundError:
        return "not installed"


def _require(ok: bool, distribution: str, what: str) -> None:
    if not ok:
        raise CompatError(f"{distribution} {_version(distribution)}: {what} (this project was written against the "
                          "version pinned in requirements.txt; see pipeline/compat.py)")


# ------------------------------------------------------------------------------------------- megatron-core

_TRACKER_NAMES = ("_MODEL_PARALLEL_RNG_TRACKER_NAME", "_DATA_PARALLEL_RNG_TRACKER_NAME",
                  "_EXPERT_PARALLEL_RNG_TRACKER_NAME")


def megatron_rng_tracker_names() -> tuple[str, str, str]:
    """(model-parallel, data-parallel, expert-parallel) stream names of megatron-core's RNG tracker (private
    module constants: our tracker must use the names megatron's layers fork)."""
    from megatron.core.tensor_parallel import random as megatron_random

    missing = [name for name in _TRACKER_NAMES if not isinstance(getattr(megatron_random, name, None), str)]
    _require(not missing, "megatron-core",
             f"megatron.core.tensor_parallel.random no longer defines {', '.join(missing)}")
    return tuple(getattr(megatron_random, name) for name in _TRACKER_NAMES)


def install_megatron_rng_tracker(tracker) -> None:
    """Makes ``get_cuda_rng_tracker()`` return ``tracker``: megatron-core has no public setter, and its own
    initialiser (``initialize_rng_tracker``) only builds CUDA trackers. Writes the two module globals that
    ``get_cuda_rng_tracker`` reads."""
    from megatron.core.tensor_parallel import random as megatron_random

    globals_needed = ("_CUDA_RNG_STATE_TRACKER", "_CUDA_RNG_STATE_TRACKER_INITIALIZED")
    missing = [name for name in globals_needed if not hasattr(megatron_random, name)]
    _require(not missing, "megatron-core", f"megatron.core.tensor_parallel.random no longer has "
                                           f"{', '.join(missing)} (the RNG tracker registry changed)")
    _require(callable(getattr(megatron_random, "get_cuda_rng_tracker", None)), "megatron-core",
             "megatron.core.tensor_parallel.random.get_cuda_rng_tracker is gone")
    megatron_random._CUDA_RNG_STATE_TRACKER = tracker
    megatron_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    _require(megatron_random.get_cuda_rng_tracker() is tracker, "megatron-core",
             "get_cuda_rng_tracker() does not return the tracker installed in _CUDA_RNG_STATE_TRACKER")


# ---------------------------------------------------------------------------------------------- DeepSpeed

def disable_universal_checkpoint_loading(engine) -> None:
    """After an engine built with ``checkpoint.load_universal`` has loaded, make its next save a native
    checkpoint. DeepSpeed reads the flag from ``engine._config.load_universal_checkpoint`` on every save and
    load and offers no setter."""
    config = getattr(engine, "_config", None)
    _require(config is not None and hasattr(config, "load_universal_checkpoint"), "deepspeed",
             "DeepSpeedEngine._config.load_universal_checkpoint is gone (the universal-checkpoint switch moved)")
    _require(callable(getattr(engine, "load_universal_checkpoint", None)), "deepspeed",
             "DeepSpeedEngine.load_universal_checkpoint() is gone")
    config.load_universal_checkpoint = False
    _require(engine.load_universal_checkpoint() is False, "deepspeed",
             "DeepSpeedEngine.load_universal_checkpoint() no longer reads _config.load_universal_checkpoint")


def optimizer_weight_decays(optimizer) -> list:
    """The weight decay of each parameter group of the torch optimizer DeepSpeed wraps (to restore after a load)."""
    groups = getattr(optimizer, "param_groups", None)
    _require(isinstance(groups, list) and all(isinstance(g, dict) and "weight_decay" in g for g in groups),
             "deepspeed", "the wrapped optimizer's param_groups are no longer dicts with a weight_decay")
    return [group["weight_decay"] for group in groups]


def undo_zero3_universal_loader_changes(optimizer, weight_decays: list) -> None:
    """DeepSpeed 0.19's ZeRO-3 universal-checkpoint loader (a re-shard) gives every optimizer param group the
    hyper-parameters of the first one, so biases and LayerNorms would be weight-decayed, and puts one shared
    ``step`` tensor into every group's state, which torch's AdamW increments in place once per group per step,
    so later groups get the wrong bias correction (measured: losses off by 1e-3 two steps after a DP=2 -> DP=1
    ZeRO-3 re-shard). Restores ``weight_decays`` (read before the load) and gives each state its own ``step``.
    A plain resume is unaffected by both corrections."""
    import torch

    groups = getattr(optimizer, "param_groups", None)
    state = getattr(optimizer, "state", None)
    _require(isinstance(groups, list) and hasattr(state, "values"), "deepspeed",
             "the wrapped optimizer no longer exposes torch's param_groups / state")
    _require(len(groups) == len(weight_decays), "deepspeed",
             f"{len(groups)} optimizer param groups after loading a checkpoint, {len(weight_decays)} before")
    for group, weight_decay in zip(groups, weight_decays):
        group["weight_decay"] = weight_decay
    for entry in state.values():
        if isinstance(entry.get("step"), torch.Tensor):
            entry["step"] = entry["step"].clone()
