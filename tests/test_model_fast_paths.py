"""The throughput paths of the model (TP=1) compute what the reference paths compute.

* ``model.layers.LINEAR_FORWARD = "auto"`` runs plain ``F.linear`` / ``F.cross_entropy`` on the megatron-core
  layers' parameters at TP=1; ``"megatron"`` runs megatron-core's own forward (custom autograd function,
  vocab-parallel cross-entropy). Loss and every gradient must agree.
* ``model.layers.compile_layers`` (``run_pretrain.py --compile``) must give the eager loss and gradients and
  leave parameter names unchanged (checkpoints do not depend on it).
(TP=2 against TP=1 is ``tests/test_model_tp.py``; exact resume is ``tests/test_resume.py``.)
"""

from __future__ import annotations

import pytest
import torch

from tp_worker import make_batch, tiny_config

pytestmark = pytest.mark.usefixtures("single_process_group")
ARCHS = ["mlm", "3ml-self", "3ml-cross"]


def loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    output = model(batch)
    output.loss.backward()
    return output.loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("arch", ARCHS)
def test_plain_torch_forward_equals_megatron_forward_at_tp1(arch, monkeypatch):
    import model.layers
    from model import build_model

    net = build_model(tiny_config(arch, pre_ln=arch != "mlm"), init_seed=5).train()
    batch = make_batch(rate=0.4, seed=2)
    monkeypatch.setattr(model.layers, "LINEAR_FORWARD", "auto")
    loss_auto, grads_auto = loss_and_grads(net, batch)
    monkeypatch.setattr(model.layers, "LINEAR_FORWARD", "megatron")
    loss_megatron, grads_megatron = loss_and_grads(net, batch)
    assert loss_auto.item() > 1.0  # an untrained model over VOCAB=300: about ln(300) = 5.7
    torch.testing.assert_close(loss_auto, loss_megatron, rtol=1e-6, atol=1e-6)
    assert grads_auto.keys() == grads_megatron.keys()
    for name in grads_auto:
        torch.testing.assert_close(grads_auto[name], grads_megatron[name], rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.timeout(600)
@pytest.mark.parametrize("arch", ["mlm", "3ml-cross"])
def test_compiled_layers_give_the_eager_loss_and_gradients(arch):
    from model import build_model
    from model.layers import compile_layers

    config = tiny_config(arch, pre_ln=True)
    eager = build_model(config, init_seed=7).train()
    compiled = build_model(config, init_seed=7).train()
    names_before = list(compiled.state_dict())
    # 3MLcross: 2 encoder + 2 decoder layers, both head transforms and the output layer.
    expected = config.num_layers + (config.decoder_num_layers + 1 if config.is_3ml else 0) + 2
    assert compile_layers(compiled) == expected
    assert list(compiled.state_dict()) == names_before
    for seed in (0, 1):  # a second batch reuses the compiled code
        batch = make_batch(rate=0.5, seed=seed)
        loss_eager, grads_eager = loss_and_grads(eager, batch)
        loss_compiled, grads_compiled = loss_and_grads(compiled, batch)
        torch.testing.assert_close(loss_compiled, loss_eager, rtol=1e-5, atol=1e-5)
        for name, grad in grads_eager.items():
            torch.testing.assert_close(grads_compiled[name], grad, rtol=1e-3, atol=1e-5, msg=name)
