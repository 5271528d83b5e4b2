"""Single-process model tests (TP=1): config presets, what each architecture reads, padding and masking
invariances, per-kind loss bookkeeping, encoder extraction, no host sync in forward."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from tp_worker import SPECIAL, VOCAB, make_batch, tiny_config

ARCHS = ["mlm", "3ml-self", "3ml-cross"]


pytestmark = pytest.mark.usefixtures("single_process_group")


def build(arch, pre_ln=False, **overrides):
    from model import build_model
    model = build_model(tiny_config(arch, pre_ln, **overrides), init_seed=3)
    return model.eval()


# ---------------------------------------------------------------------------------------------------- config
def test_presets_match_paper_table4():
    from model import ModelConfig

    base = ModelConfig.preset("base", "3ml-self")
    assert (base.num_layers, base.hidden_size, base.ffn_size, base.num_heads) == (12, 768, 3072, 12)
    assert (base.decoder_num_layers, base.decoder_hidden_size, base.decoder_ffn_size,
            base.decoder_num_heads) == (2, 384, 1536, 6)
    assert base.max_positions == 512 and base.vocab_size == 50265 and base.pre_ln is False
    assert ModelConfig.preset("base", "mlm").pre_ln is False
    assert ModelConfig.preset("base", "3ml-cross").pre_ln is True
    for arch in ARCHS:
        large = ModelConfig.preset("large", arch)
        assert (large.num_layers, large.hidden_size, large.ffn_size, large.num_heads) == (24, 1024, 4096, 16)
        assert (large.decoder_num_layers, large.decoder_hidden_size, large.decoder_ffn_size,
                large.decoder_num_heads) == (2, 512, 2048, 8)
        assert large.pre_ln is True
    assert ModelConfig.preset("tiny", "mlm", hidden_dropout=0.0).hidden_dropout == 0.0


def test_config_validation_and_round_trip():
    from model import ModelConfig

    config = ModelConfig.preset("mini", "3ml-cross", vocab_size=1000)
    assert ModelConfig.from_dict(config.to_dict()) == config
    assert config.padded_vocab_size == 1024
    with pytest.raises(ValueError, match="architecture"):
        ModelConfig(architecture="bert")
    with pytest.raises(ValueError, match="num_heads"):
        ModelConfig(hidden_size=100, num_heads=12)
    with pytest.raises(ValueError, match="dropout"):
        ModelConfig(hidden_dropout=1.5)
    with pytest.raises(ValueError, match="unknown ModelConfig fields"):
        ModelConfig.from_dict({**config.to_dict(), "tp_size": 2})
    with pytest.raises(ValueError, match="preset"):
        ModelConfig.preset("huge")
    with pytest.raises(ValueError, match="decoder_num_heads=6 is not divisible"):
        ModelConfig.preset("base", "3ml-self").check_tensor_parallel_size(4)


# --------------------------------------------------------------------------------------------- what is read
def _capture_encoder_inputs(model):
    seen = {}

    def hook(module, args):
        seen["input_ids"] = args[0].clone()
        seen["position_ids"] = None if len(args) < 2 or args[1] is None else args[1].clone()
    return seen, model.encoder.embeddings.register_forward_pre_hook(hook)


@pytest.mark.parametrize("arch", ["3ml-self", "3ml-cross"])
def test_3ml_encoder_reads_kept_tokens_at_original_positions(arch):
    batch = make_batch()
    model = build(arch)
    seen, handle = _capture_encoder_inputs(model)
    model(batch)
    handle.remove()
    assert not (seen["input_ids"] == SPECIAL.mask).any()
    assert torch.equal(seen["position_ids"], batch["kept_positions"])
    assert torch.equal(seen["input_ids"], batch["input_ids"].gather(1, batch["kept_positions"]))
    # every non-mask, non-pad token is read once; the encoder is shorter than the sequence
    assert torch.equal(batch["kept_valid"].sum(1), (batch["attention_mask"] & (batch["corruption"] != 1)).sum(1))
    assert seen["input_ids"].shape[1] < batch["input_ids"].shape[1]


def test_mlm_encoder_reads_the_full_corrupted_sequence():
    batch = make_batch()
    model = build("mlm")
    seen, handle = _capture_encoder_inputs(model)
    model(batch)
    handle.remove()
    assert torch.equal(seen["input_ids"], batch["input_ids"])
    assert (seen["input_ids"] == SPECIAL.mask).any()
    assert seen["position_ids"] is None  # positions 0..L-1: see the next test


def test_default_positions_equal_an_explicit_arange():
    """Embeddings without position ids take the table's first L rows: the same values and gradients as
    looking up 0..L-1."""
    model = build("mlm")
    embeddings = model.encoder.embeddings.eval()
    ids = make_batch()["input_ids"]
    arange = torch.arange(ids.shape[1]).expand_as(ids)
    grads = []
    for positions in (None, arange):
        embeddings.zero_grad()
        out = embeddings(ids, positions)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        grads.append((out.detach(), embeddings.position_embeddings.weight.grad.clone()))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=0, atol=0)
    torch.testing.assert_close(grads[0][1], grads[1][1], rtol=1e-6, atol=1e-7)
    assert grads[0][1][ids.shape[1]:].abs().sum() == 0 and grads[0][1][:ids.shape[1]].abs().sum() > 0


@pytest.mark.parametrize("arch", ["3ml-self", "3ml-cross"])
def test_3ml_encoder_equals_encoder_on_the_kept_subsequence(arch):
    """Per sequence, without batching tricks: the encoder over exactly the kept tokens, original positions."""
    batch = make_batch()
    model = build(arch, pre_ln=True)
    outputs = {}
    handle = model.encoder.register_forward_hook(lambda m, a, out: outputs.setdefault("h", out))
    model(batch)
    handle.remove()
    for b in range(batch["input_ids"].shape[0]):
        kept = torch.nonzero((batch["corruption"][b] != 1) & batch["attention_mask"][b]).squeeze(1)
        ids = batch["input_ids"][b, kept][None]
        reference = model.encoder(ids, torch.ones_like(ids, dtype=torch.bool), position_ids=kept[None])[0]
        torch.testing.assert_close(outputs["h"][b, :kept.numel()], reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["3ml-self", "3ml-cross"])
def test_3ml_result_depends_on_masked_ids_only_through_masking(arch):
    """Whatever id sits at a masked position (it is <mask> in real batches) cannot reach a 3ML model; for the
    vanilla MLM it does (it is the encoder's input)."""
    batch = make_batch()
    scrambled = dict(batch)
    masked = batch["corruption"] == 1
    scrambled["input_ids"] = torch.where(masked, torch.randint(5, VOCAB, masked.shape), batch["input_ids"])
    model = build(arch)
    assert torch.equal(model(batch).loss_sum_by_kind, model(scrambled).loss_sum_by_kind)
    mlm = build("mlm")
    assert not torch.equal(mlm(batch).loss, mlm(scrambled).loss)


@pytest.mark.parametrize("arch", ["3ml-self", "3ml-cross"])
def test_3ml_order_of_the_kept_sequence_does_not_matter(arch):
    """Shuffling the encoder's slots (and re-pointing kept_pred_index) leaves the loss unchanged: the encoder
    knows where a token is only through its original position id."""
    batch = make_batch(n_pad_last=20)
    model = build(arch, pre_ln=True)
    reference = model(batch).loss_sum_by_kind
    generator = torch.Generator().manual_seed(0)
    permuted = dict(batch)
    rows = []
    for b in range(batch["kept_positions"].shape[0]):
        perm = torch.randperm(batch["kept_positions"].shape[1], generator=generator)
        inverse = torch.argsort(perm)
        rows.append((perm, inverse))
    permuted["kept_positions"] = torch.stack([batch["kept_positions"][b, p] for b, (p, _) in enumerate(rows)])
    permuted["kept_valid"] = torch.stack([batch["kept_valid"][b, p] for b, (p, _) in enumerate(rows)])
    permuted["kept_pred_index"] = torch.stack([inv[batch["kept_pred_index"][b]] for b, (_, inv) in enumerate(rows)])
    assert not torch.equal(permuted["kept_positions"], batch["kept_positions"])
    torch.testing.assert_close(model(permuted).loss_sum_by_kind, reference, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("arch", ARCHS)
def test_padding_is_excluded_through_masks(arch):
    """Ids at padded positions and the length of the padded index tensors do not change anything."""
    model = build(arch, pre_ln=arch == "3ml-cross")
    batch = make_batch(n_pad_last=20)
    reference = model(batch)
    noisy = dict(batch)
    pad = ~batch["attention_mask"]
    noisy["input_ids"] = torch.where(pad, torch.randint(5, VOCAB, pad.shape), batch["input_ids"])
    torch.testing.assert_close(model(noisy).loss_sum_by_kind, reference.loss_sum_by_kind, rtol=0, atol=1e-5)
    longer = make_batch(n_pad_last=20, pad_multiple=32)  # same masks, more padding slots in the encoder
    assert longer["kept_positions"].shape[1] > batch["kept_positions"].shape[1]
    torch.testing.assert_close(model(longer).loss_sum_by_kind, reference.loss_sum_by_kind, rtol=0, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_loss_bookkeeping_by_kind(arch):
    batch = make_batch(n_pad_last=20)
    out = build(arch)(batch)
    expected = torch.tensor([float((batch["corruption"] == kind).sum()) for kind in (1, 2, 3)])
    assert torch.equal(out.count_by_kind, expected)
    assert torch.all(out.loss_sum_by_kind > 0)
    torch.testing.assert_close(out.loss, out.loss_sum_by_kind.sum() / expected.sum())
    torch.testing.assert_close(out.loss_sum, out.loss_sum_by_kind.sum())
    assert out.loss.requires_grad and not out.loss_sum_by_kind.requires_grad
    # untrained model: about log |V| per token
    assert abs(out.loss.item() - torch.log(torch.tensor(float(VOCAB)))) < 0.3


def test_mask_embedding_only_feeds_the_decoder_predictions():
    """3MLcross predicts replaced/unchanged tokens from the encoder: the [MASK] embedding cannot change them."""
    batch = make_batch()
    model = build("3ml-cross", pre_ln=True)
    before = model(batch).loss_sum_by_kind
    with torch.no_grad():
        model.decoder.mask_embedding.add_(torch.randn_like(model.decoder.mask_embedding))  # not a constant: LN
    after = model(batch).loss_sum_by_kind
    assert after[0] != before[0]
    assert torch.equal(after[1:], before[1:])
    # and it is not a vocabulary row: the word-embedding table is the tokenizer's, padded
    assert model.decoder.mask_embedding.shape == (model.config.decoder_hidden_size,)


@pytest.mark.parametrize("arch", ARCHS)
def test_every_parameter_trains(arch):
    model = build(arch, pre_ln=True, hidden_dropout=0.1, attention_dropout=0.1).train()
    model(make_batch()).loss.backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    if model.decoder is not None:  # decoder.mask_embedding trains, and only the 3ML decoder has one
        assert model.decoder.mask_embedding.grad.abs().sum() > 0


def test_padded_vocabulary_rows_are_never_predicted():
    model = build("mlm", vocab_size=VOCAB - 3)  # 297 -> padded to 304
    assert model.config.padded_vocab_size == 304
    batch = make_batch()
    batch["labels"] = batch["labels"].clamp(max=VOCAB - 4)  # real ids only
    batch["input_ids"] = batch["input_ids"].clamp(max=VOCAB - 4)
    model.train()
    model(batch).loss.backward()
    grad = model.encoder.embeddings.word_embeddings.weight.grad
    assert grad[VOCAB - 3:].abs().sum() == 0 and grad[:VOCAB - 3].abs().sum() > 0


# ------------------------------------------------------------------------------------------ encoder export
@pytest.mark.parametrize("arch", ARCHS)
def test_encoder_state_dict_drops_the_decoder(arch):
    from model import build_model

    model = build(arch, pre_ln=True)
    state = model.encoder_state_dict()
    assert state and not any(k.startswith(("decoder", "decoder_projection")) for k in state)
    assert not any(k.endswith("_extra_state") for k in state)
    assert "encoder.embeddings.word_embeddings.weight" in state and "encoder.final_layernorm.weight" in state
    assert ("head_transform.dense.weight" in state) == (arch != "3ml-self")
    # The encoder-only module loads it and computes the same features.
    fresh = build_model(tiny_config(arch, True), init_seed=99).eval()
    encoder_state = {k[len("encoder."):]: v for k, v in state.items() if k.startswith("encoder.")}
    fresh.encoder.load_state_dict(encoder_state, strict=False)
    ids = make_batch()["input_ids"]
    mask = torch.ones_like(ids, dtype=torch.bool)
    assert torch.equal(fresh.encoder(ids, mask), model.encoder(ids, mask))


def test_init_is_seeded_and_bert_like():
    from model import build_model

    a = build_model(tiny_config("3ml-self", False), init_seed=1)
    b = build_model(tiny_config("3ml-self", False), init_seed=1)
    c = build_model(tiny_config("3ml-self", False), init_seed=2)
    for (name, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(pa, pb), name
    weight = a.encoder.layers[0].mlp.fc_in.weight
    assert not torch.equal(weight, c.encoder.layers[0].mlp.fc_in.weight)
    assert abs(weight.std().item() - 0.02) < 0.003 and torch.all(a.encoder.layers[0].mlp.fc_in.bias == 0)
    assert torch.all(a.encoder.embeddings.layernorm.weight == 1)


# ------------------------------------------------------------------------------------------ static shapes
@pytest.mark.parametrize("arch", ARCHS)
def test_forward_does_not_sync_with_the_host(arch, monkeypatch):
    model = build(arch, pre_ln=True).train()
    batch = make_batch()

    def forbidden(*args, **kwargs):
        raise AssertionError("host sync inside forward")
    for method in ("item", "tolist", "nonzero", "__bool__"):
        monkeypatch.setattr(torch.Tensor, method, forbidden)
    out = model(batch)
    monkeypatch.undo()
    assert torch.isfinite(out.loss)


def test_model_parallel_mpu_adapter():
    from model.parallel import MegatronMpuForDeepSpeed

    mpu = MegatronMpuForDeepSpeed()
    assert (mpu.get_model_parallel_rank(), mpu.get_model_parallel_world_size()) == (0, 1)
    assert (mpu.get_data_parallel_rank(), mpu.get_data_parallel_world_size()) == (0, 1)
    assert mpu.get_model_parallel_group() is not None and mpu.get_data_parallel_group() is not None
    assert mpu.get_data_parallel_group_ranks() == [0] and mpu.get_tensor_model_parallel_src_rank() == 0
    assert (mpu.get_pipeline_model_parallel_rank(), mpu.get_pipeline_model_parallel_world_size()) == (0, 1)


def test_tensor_parallel_split_and_merge_round_trip():
    from model import merge_tensor_parallel_shards, split_for_tensor_parallel, tensor_parallel_dim

    full = torch.arange(6 * 8 * 4, dtype=torch.float32).reshape(6 * 8, 4)  # [W_q; W_k; W_v], 16 rows each
    name = "encoder.layers.3.self_attention.qkv.weight"
    shards = [split_for_tensor_parallel(name, full, rank, 2) for rank in range(2)]
    # rank 0 holds the first half of each of W_q, W_k, W_v
    assert torch.equal(shards[0], torch.cat([full[0:8], full[16:24], full[32:40]]))
    assert torch.equal(merge_tensor_parallel_shards(name, shards), full)
    assert tensor_parallel_dim("decoder.layers.0.cross_attention.out.weight") == 1
    assert tensor_parallel_dim("decoder.layers.0.cross_attention.out.bias") is None
    assert tensor_parallel_dim("encoder.embeddings.word_embeddings.weight") == 0
    assert tensor_parallel_dim("encoder.embeddings.position_embeddings.weight") is None
    assert tensor_parallel_dim("output_layer.bias") == 0


def test_config_dataclass_fields_are_documented():
    import inspect

    from model import ModelConfig

    source = inspect.getsource(ModelConfig)
    for field in dataclasses.fields(ModelConfig):
        after = source.split(f"    {field.name}:", 1)[1].split("\n", 2)
        assert '"""' in after[1], f"ModelConfig.{field.name} has no docstring"
