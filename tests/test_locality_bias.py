"""The 3ML decoder's locality prior (``ModelConfig.decoder_locality_bias``): the mask's values, the attention it
gives, that it reaches every decoder attention at the tokens' original positions, and that 0 leaves the model
as it was (a boolean key-padding mask). Whether it makes the demo learn from context is the shortened demo's
test (tests/test_train_demo.py)."""

from __future__ import annotations

import math

import pytest
import torch

from tp_worker import VOCAB, make_batch, tiny_config

pytestmark = pytest.mark.usefixtures("single_process_group")
INF = float("inf")


def build(arch, slope, **overrides):
    """A tiny pre-LN model; weights at std 0.2, not BERT's 0.02, so attention is far from uniform already at
    initialisation and what a decoder query attends to shows in the loss."""
    from model import build_model
    config = tiny_config(arch, True, decoder_locality_bias=slope, init_std=0.2, **overrides)
    return build_model(config, init_seed=5).eval()


def test_mask_values_for_batched_and_shared_positions():
    from model.layers import key_padding_mask, locality_bias

    valid = torch.tensor([[True, True, False]])
    positions = torch.tensor([[0, 2, 5]])
    mask = locality_bias(key_padding_mask(valid), 0.5, positions, positions)
    expected = torch.tensor([[0.0, -1.0, -INF], [-1.0, 0.0, -INF], [-2.5, -1.5, -INF]])
    assert mask.shape == (1, 1, 3, 3) and mask.dtype == torch.float32
    assert torch.equal(mask[0, 0], expected)
    shared = locality_bias(key_padding_mask(torch.ones(2, 4, dtype=torch.bool)), 2.0, torch.arange(4),
                           torch.arange(4))
    assert shared.shape == (2, 1, 4, 4)
    assert torch.equal(shared[0, 0, 3], torch.tensor([-6.0, -4.0, -2.0, 0.0]))


def test_attention_with_the_bias_is_the_written_out_softmax():
    """softmax(q k^T / sqrt(d_h) - slope |i - j|) v through the fused qkv and output projections."""
    from model.layers import Attention, key_padding_mask, locality_bias, megatron_config

    torch.manual_seed(0)
    hidden, heads, length, slope = 16, 2, 6, 0.8
    attention = Attention(hidden, heads, 0.0, 0.3, megatron_config(tiny_config("3ml-self", True))).eval()
    x = torch.randn(2, length, hidden)
    valid = torch.ones(2, length, dtype=torch.bool)
    valid[1, 4:] = False
    positions = torch.tensor([[0, 1, 3, 4, 8, 9], [0, 2, 3, 5, 0, 0]])
    out = attention(x, locality_bias(key_padding_mask(valid), slope, positions, positions))

    q, k, v = (x @ attention.qkv.weight.T + attention.qkv.bias).split(hidden, dim=-1)
    q, k, v = (t.view(2, length, heads, hidden // heads).transpose(1, 2) for t in (q, k, v))
    scores = q @ k.transpose(-1, -2) / math.sqrt(hidden // heads)
    scores = scores - slope * (positions[:, None, :, None] - positions[:, None, None, :]).abs()
    scores = scores.masked_fill(~valid[:, None, None, :], -INF)
    context = (scores.softmax(-1) @ v).transpose(1, 2).reshape(2, length, hidden)
    expected = context @ attention.out.weight.T + attention.out.bias
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


def test_zero_slope_keeps_the_boolean_mask_and_the_same_model():
    batch = make_batch()
    for arch in ("3ml-self", "3ml-cross"):
        off, on = build(arch, 0.0), build(arch, 1.0)
        assert off.decoder.attention_mask(batch["attention_mask"]).dtype == torch.bool
        assert on.decoder.attention_mask(batch["attention_mask"]).dtype == torch.float32
        # Same weights (the slope is no parameter), different loss: the bias is used.
        assert off.state_dict().keys() == on.state_dict().keys()
        assert all(torch.equal(a, b) for a, b in zip(off.state_dict().values(), on.state_dict().values())
                   if isinstance(a, torch.Tensor))
        with torch.no_grad():
            assert abs(float(off(batch).loss) - float(on(batch).loss)) > 0.01


def test_3ml_self_decoder_with_a_steep_bias_sees_only_its_own_position():
    """A slope so steep that exp(-slope) is 0 in fp32 leaves each decoder query attending to itself alone; with
    one decoder layer a [MASK] position's prediction then reads nothing of the encoder (its input is the [MASK]
    embedding at its position), so changing the visible tokens leaves the masked loss as it was -- and changes
    it without the bias."""
    batch = make_batch(n_pad_last=0)
    other = dict(batch)
    kept = torch.zeros_like(batch["input_ids"], dtype=torch.bool).scatter(1, batch["kept_positions"],
                                                                           batch["kept_valid"])
    kept[:, 0] = False  # keep <s>
    scrambled = torch.randint(5, VOCAB, kept.shape, generator=torch.Generator().manual_seed(1))
    other["input_ids"] = torch.where(kept, scrambled, batch["input_ids"])
    assert not torch.equal(other["input_ids"], batch["input_ids"])
    steep, free = build("3ml-self", 1e4), build("3ml-self", 0.0)
    assert torch.equal(steep(batch).loss_sum_by_kind[0], steep(other).loss_sum_by_kind[0])
    assert abs(float(free(batch).loss_sum_by_kind[0] - free(other).loss_sum_by_kind[0])) > 1.0


def test_3ml_cross_masks_use_mask_and_kept_positions():
    """Self-attention among the [MASK] queries at their positions; cross-attention from them to the kept
    tokens at theirs, padding slots at -inf."""
    batch = make_batch(n_pad_last=20)
    model = build("3ml-cross", 0.5)
    masks = {}
    layer = model.decoder.layers[0]
    for name in ("self", "cross"):
        getattr(layer, f"{name}_attention").register_forward_pre_hook(
            lambda _module, args, name=name: masks.update({name: args[1]}))  # returns None: args unchanged
    model(batch)
    mask_positions, kept_positions = batch["mask_positions"], batch["kept_positions"]
    expected_self = -0.5 * (mask_positions[:, :, None] - mask_positions[:, None, :]).abs().float()
    expected_self = expected_self.masked_fill(~batch["mask_valid"][:, None, :], -INF)
    assert torch.equal(masks["self"][:, 0], expected_self)
    expected_cross = -0.5 * (mask_positions[:, :, None] - kept_positions[:, None, :]).abs().float()
    expected_cross = expected_cross.masked_fill(~batch["kept_valid"][:, None, :], -INF)
    assert (~batch["kept_valid"]).any()
    assert torch.equal(masks["cross"][:, 0], expected_cross)


def test_bf16_autocast_runs_with_the_float_mask():
    batch = make_batch()
    model = build("3ml-self", 1.0)
    with torch.no_grad():
        reference = model(batch).loss
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(batch).loss
    assert torch.isfinite(low) and abs(float(low) - float(reference)) < 0.05 * float(reference)


@pytest.mark.parametrize("bad", [-0.1, float("nan"), float("inf"), True, "1"])
def test_config_rejects_a_bad_slope(bad):
    from model import ModelConfig
    with pytest.raises(ValueError, match="decoder_locality_bias"):
        ModelConfig.preset("tiny", "3ml-self", decoder_locality_bias=bad)


def test_config_round_trip_and_old_configs_load_without_it():
    from model import ModelConfig
    config = ModelConfig.preset("tiny", "3ml-cross", decoder_locality_bias=1.5)
    assert ModelConfig.from_dict(config.to_dict()) == config
    old = config.to_dict()
    del old["decoder_locality_bias"]
    assert ModelConfig.from_dict(old).decoder_locality_bias == 0.0
