"""The batch contract shared by the data pipeline and the models: special-token ids, corruption kinds and
the layout of a masked batch (written by ``pipeline.data.masking``, read by ``model/``).

Batch layout (``collate`` output, all ``torch`` tensors, ``B`` sequences of ``L = seq_len`` tokens)::

    input_ids        [B, L]  int64  corrupted sequence (the vanilla MLM's input)
    labels           [B, L]  int64  original id at corrupted positions, -100 elsewhere
    corruption       [B, L]  int8   KIND_NONE / KIND_MASKED / KIND_REPLACED / KIND_UNCHANGED
    attention_mask   [B, L]  bool   True at real tokens, False at <pad>
    pred_positions   [B, Lp] int64  corrupted positions, ascending (sparse MLM head); pads = 0
    pred_valid       [B, Lp] bool
    kept_positions   [B, Le] int64  positions that are neither <mask> nor <pad>, ascending: the 3ML encoder
                                    input is input_ids.gather(1, kept_positions) at position ids
                                    kept_positions; Le is padded up to a multiple of ``pad_multiple``
    kept_valid       [B, Le] bool   the encoder's padding mask
    mask_positions   [B, Lm] int64  positions of <mask> tokens, ascending (3ML decoder queries); pads = 0
    mask_valid       [B, Lm] bool
    kept_pred_index  [B, Lr] int64  indices *into the kept sequence* (0..Le-1) of replaced and unchanged
                                    tokens (3MLcross predicts them from the encoder output); pads = 0
    kept_pred_valid  [B, Lr] bool
    sample_index     [B]     int64  global sample index (for debugging and determinism checks)
"""

from __future__ import annotations

from dataclasses import dataclass

KIND_NONE = 0
KIND_MASKED = 1
KIND_REPLACED = 2
KIND_UNCHANGED = 3
KIND_NAMES = {KIND_MASKED: "masked", KIND_REPLACED: "replaced", KIND_UNCHANGED: "unchanged"}
IGNORE_INDEX = -100


@dataclass(frozen=True)
class SpecialTokens:
    """Ids of the RoBERTa special tokens in the tokenizer's vocabulary."""

    bos: int  # <s>
    pad: int  # <pad>
    eos: int  # </s>
    unk: int  # <unk>
    mask: int  # <mask>

    def as_list(self) -> list[int]:
        return [self.bos, self.pad, self.eos, self.unk, self.mask]
