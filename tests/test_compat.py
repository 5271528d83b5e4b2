"""pipeline.compat: each write into megatron-core's or DeepSpeed's internals works on the pinned versions and
fails with one line naming the library, its version and what changed when the internal is gone."""

from __future__ import annotations

from importlib.metadata import version
from types import SimpleNamespace

import pytest
import torch

from pipeline import compat
from pipeline.compat import CompatError


def test_megatron_rng_tracker_install_and_names():
    from megatron.core.tensor_parallel import random as megatron_random

    before = (megatron_random._CUDA_RNG_STATE_TRACKER, megatron_random._CUDA_RNG_STATE_TRACKER_INITIALIZED)
    tracker = object()
    try:
        compat.install_megatron_rng_tracker(tracker)
        assert megatron_random.get_cuda_rng_tracker() is tracker
    finally:
        megatron_random._CUDA_RNG_STATE_TRACKER, megatron_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = before
    assert compat.megatron_rng_tracker_names() == ("model-parallel-rng", "data-parallel-rng",
                                                   "expert-parallel-rng")


def test_megatron_tracker_registry_gone_is_named(monkeypatch):
    from megatron.core.tensor_parallel import random as megatron_random

    monkeypatch.delattr(megatron_random, "_CUDA_RNG_STATE_TRACKER")
    with pytest.raises(CompatError) as caught:
        compat.install_megatron_rng_tracker(object())
    message = str(caught.value)
    assert message.startswith(f"megatron-core {version('megatron-core')}: ") and "_CUDA_RNG_STATE_TRACKER" in message
    assert "\n" not in message


def test_megatron_tracker_names_gone_is_named(monkeypatch):
    from megatron.core.tensor_parallel import random as megatron_random

    monkeypatch.delattr(megatron_random, "_MODEL_PARALLEL_RNG_TRACKER_NAME")
    with pytest.raises(CompatError, match=r"megatron-core .*_MODEL_PARALLEL_RNG_TRACKER_NAME"):
        compat.megatron_rng_tracker_names()


class _Config:
    load_universal_checkpoint = True


class _Engine:
    """The two members of DeepSpeedEngine that disable_universal_checkpoint_loading relies on."""

    def __init__(self, config):
        self._config = config

    def load_universal_checkpoint(self):
        return self._config.load_universal_checkpoint


def test_universal_switch_is_turned_off_and_its_absence_is_named():
    from deepspeed.runtime.engine import DeepSpeedEngine

    # the member we call is DeepSpeed's own: it reads the flag we write
    assert DeepSpeedEngine.load_universal_checkpoint(_Engine(_Config())) is True
    engine = _Engine(_Config())
    compat.disable_universal_checkpoint_loading(engine)
    assert engine.load_universal_checkpoint() is False
    with pytest.raises(CompatError, match=rf"^deepspeed {version('deepspeed')}: .*_config.load_universal_checkpoint"):
        compat.disable_universal_checkpoint_loading(_Engine(SimpleNamespace()))


def test_zero3_universal_loader_corrections():
    decay = torch.nn.Parameter(torch.ones(2, 2))
    bias = torch.nn.Parameter(torch.ones(2))
    optimizer = torch.optim.AdamW([{"params": [decay], "weight_decay": 0.01}, {"params": [bias], "weight_decay": 0.0}])
    weight_decays = compat.optimizer_weight_decays(optimizer)
    # what DeepSpeed 0.19's ZeRO-3 universal loader leaves behind: the first group's hyper-parameters everywhere,
    # one step tensor shared by every parameter's state
    shared = torch.tensor(3.0)
    for group in optimizer.param_groups:
        group["weight_decay"] = 0.01
    for param in (decay, bias):
        optimizer.state[param] = {"step": shared, "exp_avg": torch.zeros_like(param),
                                  "exp_avg_sq": torch.zeros_like(param)}
    compat.undo_zero3_universal_loader_changes(optimizer, weight_decays)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.01, 0.0]
    steps = [optimizer.state[p]["step"] for p in (decay, bias)]
    assert steps[0] is not steps[1] and all(float(s) == 3.0 for s in steps)
    decay.grad, bias.grad = torch.ones_like(decay), torch.ones_like(bias)
    optimizer.step()
    assert [float(optimizer.state[p]["step"]) for p in (decay, bias)] == [4.0, 4.0]  # each counted once

    with pytest.raises(CompatError, match=r"^deepspeed .*3 optimizer param groups after loading .* 2 before"):
        compat.undo_zero3_universal_loader_changes(SimpleNamespace(param_groups=[{}, {}, {}], state={}), [0.0, 0.0])
    with pytest.raises(CompatError, match=r"^deepspeed .*weight_decay"):
        compat.optimizer_weight_decays(SimpleNamespace(param_groups=[{"lr": 1.0}]))
