import numpy as np
import pytest
import torch

from pipeline.data.batch import IGNORE_INDEX, KIND_MASKED, KIND_NONE, KIND_REPLACED, KIND_UNCHANGED
from pipeline.data.batch import SpecialTokens
from pipeline.data.masking import Masker, MaskingCollator, MaskingConfig, parse_strategy

SPECIAL = SpecialTokens(bos=0, pad=1, eos=2, unk=3, mask=4)
VOCAB = 300


def packed_sequence(rng, seq_len, n_pad=0):
    """<s> doc </s> doc </s> ... like FULL-SENTENCES packing, ids 5..VOCAB-1 for text."""
    body = rng.integers(5, VOCAB, size=seq_len)
    body[0] = SPECIAL.bos
    body[rng.choice(np.arange(1, seq_len), size=seq_len // 20, replace=False)] = SPECIAL.eos
    body[seq_len - n_pad - 1] = SPECIAL.eos
    if n_pad:
        body[seq_len - n_pad:] = SPECIAL.pad
    return body


@pytest.mark.parametrize("rate", [0.15, 0.3, 0.4, 0.5])
@pytest.mark.parametrize("strategy", ["80-10-10", "100-0-0", "80-0-20"])
def test_counts_and_proportions_are_exact_per_sequence(rate, strategy):
    config = MaskingConfig(rate=rate, strategy=strategy)
    masker = Masker(config, SPECIAL, VOCAB)
    rng = np.random.default_rng(0)
    f_mask, f_rand, f_same = parse_strategy(strategy)
    for index in range(50):
        tokens = packed_sequence(rng, 128)
        s = masker(tokens, sample_index=index, epoch=0)
        k = int(np.floor(rate * 128 + 0.5))
        assert np.count_nonzero(s.corruption) == k
        n_mask = int(np.floor(f_mask * k + 0.5))
        assert np.count_nonzero(s.corruption == KIND_MASKED) == n_mask
        assert np.count_nonzero(s.corruption == KIND_REPLACED) == min(k - n_mask, int(np.floor(f_rand * k + 0.5)))
        # specials never corrupted; labels exactly the originals at corrupted positions
        special_pos = np.isin(tokens, [SPECIAL.bos, SPECIAL.eos, SPECIAL.pad])
        assert not np.any(s.corruption[special_pos])
        corrupted = s.corruption != KIND_NONE
        np.testing.assert_array_equal(s.labels[corrupted], tokens[corrupted])
        assert np.all(s.labels[~corrupted] == IGNORE_INDEX)
        np.testing.assert_array_equal(s.input_ids[~corrupted], tokens[~corrupted])
        assert np.all(s.input_ids[s.corruption == KIND_MASKED] == SPECIAL.mask)
        np.testing.assert_array_equal(s.input_ids[s.corruption == KIND_UNCHANGED],
                                      tokens[s.corruption == KIND_UNCHANGED])
        replaced = s.input_ids[s.corruption == KIND_REPLACED]
        assert not np.isin(replaced, SPECIAL.as_list()).any()
    if f_same == 0:
        assert not np.any(s.corruption == KIND_UNCHANGED)


def test_mask_is_deterministic_in_seed_epoch_and_index():
    masker = Masker(MaskingConfig(rate=0.4), SPECIAL, VOCAB)
    tokens = packed_sequence(np.random.default_rng(1), 64)
    a, b = masker(tokens, 7, epoch=3), masker(tokens, 7, epoch=3)
    np.testing.assert_array_equal(a.input_ids, b.input_ids)
    assert not np.array_equal(a.corruption, masker(tokens, 8, epoch=3).corruption)
    assert not np.array_equal(a.corruption, masker(tokens, 7, epoch=4).corruption)
    other = Masker(MaskingConfig(rate=0.4, seed=99), SPECIAL, VOCAB)
    assert not np.array_equal(a.corruption, other(tokens, 7, epoch=3).corruption)


def test_batch_layout_static_shapes_and_encoder_never_sees_mask():
    config = MaskingConfig(rate=0.5, strategy="80-10-10", pad_multiple=8)
    masker = Masker(config, SPECIAL, VOCAB)
    rng = np.random.default_rng(2)
    seq_len = 100
    samples = [masker(packed_sequence(rng, seq_len), i) for i in range(6)]
    samples.append(masker(packed_sequence(rng, seq_len, n_pad=37), 6))  # the last, padded sequence
    batch = MaskingCollator(config, SPECIAL.pad)(samples)
    shapes = config.shapes(seq_len)
    assert shapes.n_corrupt == 50 and shapes.n_mask == 40 and shapes.encoder_len == 64  # 60 kept -> 64
    assert batch["kept_positions"].shape == (7, shapes.encoder_len)
    assert batch["mask_positions"].shape == (7, shapes.n_mask)
    assert batch["pred_positions"].shape == (7, shapes.n_corrupt)
    assert batch["kept_pred_index"].shape == (7, shapes.n_kept_pred)
    ids = batch["input_ids"]
    enc_ids = ids.gather(1, batch["kept_positions"])
    assert not torch.any((enc_ids == SPECIAL.mask) & batch["kept_valid"])
    assert not torch.any((enc_ids == SPECIAL.pad) & batch["kept_valid"])
    # full sequences: every non-mask token is kept, in order, at its original position
    for i in range(6):
        kept = batch["kept_positions"][i][batch["kept_valid"][i]]
        assert torch.equal(kept, torch.nonzero(ids[i] != SPECIAL.mask).flatten())
        assert int(batch["mask_valid"][i].sum()) == shapes.n_mask
    # the padded sequence: fewer masks, no pad kept, attention mask covers exactly the real tokens
    assert int(batch["attention_mask"][6].sum()) == seq_len - 37
    assert int(batch["mask_valid"][6].sum()) < shapes.n_mask
    # replaced/unchanged found through the kept sequence
    for i in range(7):
        idx = batch["kept_pred_index"][i][batch["kept_pred_valid"][i]]
        pos = batch["kept_positions"][i][idx]
        kinds = batch["corruption"][i][pos]
        assert torch.all((kinds == KIND_REPLACED) | (kinds == KIND_UNCHANGED))
        assert idx.numel() == int(((batch["corruption"][i] == KIND_REPLACED) |
                                   (batch["corruption"][i] == KIND_UNCHANGED)).sum())
        labels_at_pred = batch["labels"][i].gather(0, batch["pred_positions"][i][batch["pred_valid"][i]])
        assert torch.all(labels_at_pred != IGNORE_INDEX)


@pytest.mark.parametrize("bad", ["80-10", "80-10-20", "a-b-c", "-10-100-10"])
def test_bad_strategy_is_refused_with_a_clear_message(bad):
    with pytest.raises(ValueError, match="masking strategy"):
        MaskingConfig(strategy=bad)


def test_bad_rate_is_refused():
    with pytest.raises(ValueError, match="masking rate"):
        MaskingConfig(rate=1.5)
