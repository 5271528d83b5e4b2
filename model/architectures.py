"""The three pre-training architectures: vanilla MLM (RoBERTa), 3MLself and 3MLcross (paper §2, Figure 2).

They share the encoder (``TransformerEncoder``: word + position embeddings, LayerNorm, Transformer layers), the
prediction-layer transform and the tied vocabulary projection. What differs is what the encoder sees and what
comes after it, all read from the static-shape index tensors of the batch (``pipeline/data/masking.py``):

* ``mlm``: the encoder reads the whole corrupted sequence ``input_ids`` (``<mask>`` ids included) at positions
  ``0..L-1``; the head runs only at ``pred_positions`` (RoBERTa's sparse prediction).
* ``3ml-self``: the encoder reads only the kept tokens, ``input_ids.gather(kept_positions)`` at their original
  position ids ``kept_positions`` -- it never sees a ``<mask>``. Its output is projected to the decoder width
  (``decoder_projection``) and scattered back to a full-length sequence whose masked positions hold the learned
  ``decoder.mask_embedding`` (a vector in decoder space, not the word embedding of ``<mask>``); a separate
  ``decoder.position_embeddings`` is added, then LayerNorm, dropout and the decoder layers (self-attention over
  the full length). ``decoder.head_transform`` projects back to the encoder width and the tied vocabulary
  projection predicts every corrupted token (masked, replaced, unchanged) at ``pred_positions``.
* ``3ml-cross``: the same encoder; the decoder's queries are only the ``<mask>`` positions (``mask_embedding`` +
  decoder position embedding at ``mask_positions``); each decoder layer has self-attention among them,
  cross-attention to the projected encoder output (plus the decoder position embedding of each kept token's
  original position, so queries and keys share one position table) and an MLP. Masked tokens are predicted
  from the decoder via ``decoder.head_transform`` (d_de -> d_en); replaced and unchanged tokens from the encoder
  output at ``kept_pred_index`` via ``head_transform`` (d_en -> d_en). Both share the vocabulary projection and its bias
  (Appendix D eq. 4 counts exactly these two prediction layers).

Parameter names (stable; TP-split ones marked with their partition dim, see ``tensor_parallel_dim``) and their
Hugging Face RoBERTa counterparts for the exported encoder (``L`` = layer index)::

    encoder.embeddings.word_embeddings.weight      [Vp/tp, d] dim 0  roberta.embeddings.word_embeddings.weight
                                                                     (rows [:vocab_size]; Vp = padded vocab)
    encoder.embeddings.position_embeddings.weight  [P, d]            roberta.embeddings.position_embeddings.weight
                                                                     (HF has P+2 rows: ours are rows 2.. since HF
                                                                     position ids start at pad_token_id + 1;
                                                                     rows 0,1 unused; token_type_embeddings = 0)
    encoder.embeddings.layernorm.{weight,bias}                       roberta.embeddings.LayerNorm
    encoder.layers.L.self_attention.qkv.{weight,bias}   dim 0, stride 3: merged full weight is [W_q; W_k; W_v]
                                                        -> ...encoder.layer.L.attention.self.{query,key,value}
    encoder.layers.L.self_attention.out.weight     dim 1             ...attention.output.dense.weight
    encoder.layers.L.self_attention.out.bias                         ...attention.output.dense.bias
    encoder.layers.L.self_attention_layernorm                        post-LN: ...attention.output.LayerNorm
                                                                     pre-LN (RobertaPreLayerNorm):
                                                                     ...attention.LayerNorm
    encoder.layers.L.mlp.fc_in.{weight,bias}       dim 0             ...intermediate.dense
    encoder.layers.L.mlp.fc_out.weight             dim 1             ...output.dense.weight
    encoder.layers.L.mlp.fc_out.bias                                 ...output.dense.bias
    encoder.layers.L.mlp_layernorm                                   post-LN: ...output.LayerNorm;
                                                                     pre-LN: ...intermediate.LayerNorm
    encoder.final_layernorm (pre-LN only)                            roberta_prelayernorm.LayerNorm (model level)
    head_transform.dense / .layernorm (mlm, 3ml-cross)               lm_head.dense / lm_head.layer_norm
    output_layer.bias                              [Vp/tp] dim 0     lm_head.bias (rows [:vocab_size])
    output_layer.weight (only if untied)           [Vp/tp, d] dim 0  lm_head.decoder.weight
    decoder_projection, decoder.*                  (3ML only; dropped for fine-tuning)

``3ml-self`` has no encoder-width head transform (its prediction layer reads the decoder), so its export has
no ``lm_head.dense``. Megatron layers also put ``*._extra_state`` entries (None) in ``state_dict()``; they hold
no tensor.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from megatron.core import parallel_state

from model.config import ModelConfig
from model.layers import (HeadTransform, OutputLayer, TransformerStack, WordEmbedding, key_padding_mask,
                          locality_bias, megatron_config)
from pipeline.data.batch import KIND_MASKED




@dataclass
class ModelOutput:
    """What ``forward(batch)`` returns. Identical on all TP ranks."""

    loss: torch.Tensor
    """Scalar: mean cross-entropy over the valid predicted tokens of the micro batch (``loss_sum / count``)."""
    loss_sum: torch.Tensor
    """Scalar, differentiable: sum of the per-token cross-entropies (for token-weighted accumulation)."""
    num_predictions: torch.Tensor
    """Scalar float: number of valid predicted tokens (``count_by_kind.sum()``)."""
    loss_sum_by_kind: torch.Tensor
    """``[3]`` fp32, detached: summed cross-entropy of masked, replaced, unchanged tokens (perplexity)."""
    count_by_kind: torch.Tensor
    """``[3]`` fp32: number of masked, replaced, unchanged tokens predicted."""


class Embeddings(torch.nn.Module):
    """Word (vocab-parallel) + learned absolute position embeddings, LayerNorm, dropout."""

    def __init__(self, config: ModelConfig, mp):
        super().__init__()
        self.word_embeddings = WordEmbedding(config, mp, config.hidden_size)
        self.position_embeddings = PositionEmbedding(config.max_positions, config.hidden_size)
        self.layernorm = torch.nn.LayerNorm(config.hidden_size, eps=config.layernorm_eps)
        self.dropout = config.hidden_dropout

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """position_ids ``[B, L]``, or None for ``0..L-1``: then the first L rows of the table, broadcast over
        the batch -- the same values as looking up an arange, in one slice instead of arange, expand and a
        lookup (and a slice's backward instead of the lookup's scatter-add)."""
        x = self.word_embeddings(input_ids) + self.position_embeddings(position_ids, input_ids.shape[1])
        return F.dropout(self.layernorm(x), self.dropout, self.training)


class PositionEmbedding(torch.nn.Embedding):
    """A learned position table. ``forward(position_ids [B, L])`` looks rows up; ``forward(None, length)`` returns
    the first ``length`` rows ``[L, d]`` (one slice instead of arange, expand and a lookup). Always called as a
    module, never read through ``.weight`` by its owner: DeepSpeed ZeRO-3 gathers a partitioned weight only in
    the module's own pre-forward hook."""

    def forward(self, position_ids: torch.Tensor | None, length: int | None = None) -> torch.Tensor:
        if position_ids is None:
            return self.weight[:length]
        return super().forward(position_ids)


class TransformerEncoder(TransformerStack):
    """The part kept for fine-tuning: embeddings and encoder layers (+ final LayerNorm for pre-LN)."""

    def __init__(self, config: ModelConfig, mp):
        super().__init__(config.num_layers, config.hidden_size, config.ffn_size, config.num_heads, config, mp)
        self.embeddings = Embeddings(config, mp)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids ``[B, L]``, attention_mask ``[B, L]`` bool (True = real token), position_ids ``[B, L]``
        (default ``0..L-1``) -> hidden states ``[B, L, d_en]``."""
        x = self.embeddings(input_ids, position_ids)
        return self.run_layers(x, key_padding_mask(attention_mask))


class Decoder(TransformerStack):
    """3ML decoder: ``[MASK]`` embedding and position embeddings in decoder space, Transformer layers (with
    cross-attention for 3MLcross), and the prediction transform back to the encoder width."""

    def __init__(self, config: ModelConfig, mp):
        width = config.decoder_hidden_size
        super().__init__(config.decoder_num_layers, width, config.decoder_ffn_size, config.decoder_num_heads,
                         config, mp, cross=config.architecture == "3ml-cross")
        self.mask_embedding = torch.nn.Parameter(torch.empty(width))
        self.position_embeddings = PositionEmbedding(config.max_positions, width)
        self.embedding_layernorm = torch.nn.LayerNorm(width, eps=config.layernorm_eps)
        self.head_transform = HeadTransform(width, config)
        self.dropout = config.hidden_dropout
        self.locality_slope = config.decoder_locality_bias

    def attention_mask(self, key_valid: torch.Tensor, query_positions: torch.Tensor | None = None,
                       key_positions: torch.Tensor | None = None) -> torch.Tensor:
        """The SDPA mask of a decoder attention: ``key_padding_mask(key_valid)``, plus the locality bias between
        the tokens' original positions when ``decoder_locality_bias`` is set (positions None: ``0..L-1``)."""
        mask = key_padding_mask(key_valid)
        if not self.locality_slope:
            return mask
        if query_positions is None:
            query_positions = key_positions = torch.arange(key_valid.shape[-1], device=key_valid.device)
        return locality_bias(mask, self.locality_slope, query_positions, key_positions)

    def embed(self, x: torch.Tensor, position_ids: torch.Tensor | None) -> torch.Tensor:
        """x ``[B, N, d_de]`` + decoder position embeddings at position_ids ``[B, N]`` (None: ``0..N-1``),
        LayerNorm, dropout."""
        x = x + self.position_embeddings(position_ids, x.shape[1])
        return F.dropout(self.embedding_layernorm(x), self.dropout, self.training)


def _gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x ``[B, L, d]``, index ``[B, N]`` -> ``x[b, index[b, n]]`` ``[B, N, d]``."""
    return x.gather(1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


class PretrainingModel(torch.nn.Module):
    """One of ``mlm`` / ``3ml-self`` / ``3ml-cross`` (``config.architecture``); build with ``build_model``."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        mp = megatron_config(config)
        self.encoder = TransformerEncoder(config, mp)
        self.output_layer = OutputLayer(config, mp)
        # Encoder-width prediction transform: mlm (all corrupted) and 3ml-cross (replaced + unchanged).
        self.head_transform = HeadTransform(config.hidden_size, config) if config.architecture != "3ml-self" else None
        if config.is_3ml:
            self.decoder_projection = torch.nn.Linear(config.hidden_size, config.decoder_hidden_size)
            self.decoder = Decoder(config, mp)
        else:
            self.decoder_projection = None
            self.decoder = None
        self._init_replicated_weights()

    def _init_replicated_weights(self):
        """Megatron layers initialised themselves (normal(0, init_std) master weight, zero bias); the replicated
        torch modules get the same BERT initialisation here, in a fixed order."""
        std = self.config.init_std
        for name, module in self.named_modules():
            if isinstance(module, torch.nn.Linear):
                torch.nn.init.normal_(module.weight, 0.0, std)
                torch.nn.init.zeros_(module.bias)
            elif isinstance(module, torch.nn.Embedding):
                torch.nn.init.normal_(module.weight, 0.0, std)
            elif isinstance(module, torch.nn.LayerNorm):
                torch.nn.init.ones_(module.weight)
                torch.nn.init.zeros_(module.bias)
        if self.decoder is not None:
            # The decoder's input is LayerNorm(content + position): at kept tokens the content is the projected
            # encoder output, whose elements have std ~ init_std * sqrt(d_en) (the encoder output is
            # LayerNorm-ed). Position and [MASK] embeddings at BERT's 0.02 would vanish next to it, leaving the
            # decoder unable to tell where a token is (measured: a copy task 3MLself never learned); at the
            # same scale as the content they are as visible as BERT's position embeddings are to its words.
            decoder_std = std * self.config.hidden_size ** 0.5
            torch.nn.init.normal_(self.decoder.position_embeddings.weight, 0.0, decoder_std)
            torch.nn.init.normal_(self.decoder.mask_embedding, 0.0, decoder_std)

    # ------------------------------------------------------------------------------------------------------
    def _token_losses(self, hidden: torch.Tensor, transform, targets: torch.Tensor, valid: torch.Tensor):
        """Per-token cross-entropy ``[B, N]`` at the given hidden states; invalid slots get target 0, loss 0."""
        targets = torch.where(valid, targets, torch.zeros_like(targets))
        losses = self.output_layer(transform(hidden), targets, self.encoder.embeddings.word_embeddings.weight)
        return losses * valid

    def _encode_kept(self, batch):
        """3ML encoder over the kept tokens at their original positions -> ``[B, Le, d_en]``."""
        kept_positions = batch["kept_positions"]
        kept_ids = batch["input_ids"].gather(1, kept_positions)
        return self.encoder(kept_ids, batch["kept_valid"], position_ids=kept_positions)

    def _forward_mlm(self, batch):
        hidden = self.encoder(batch["input_ids"], batch["attention_mask"])
        pred_positions, valid = batch["pred_positions"], batch["pred_valid"]
        losses = self._token_losses(_gather_rows(hidden, pred_positions), self.head_transform,
                                    batch["labels"].gather(1, pred_positions), valid)
        return losses, batch["corruption"].gather(1, pred_positions), valid

    def _forward_3ml_self(self, batch):
        input_ids, corruption = batch["input_ids"], batch["corruption"]
        batch_size, seq_len = input_ids.shape
        projected = self.decoder_projection(self._encode_kept(batch))
        # Scatter the kept outputs back to their positions over a sequence of [MASK] embeddings: every position
        # that is not kept is a masked one (or padding, whose outputs are never read and which no real query
        # attends to). Invalid (padding) kept slots go to a spare column L that is dropped, so no two valid
        # writes collide and shapes stay static.
        target = torch.where(batch["kept_valid"], batch["kept_positions"], seq_len)
        masks = self.decoder.mask_embedding.to(projected.dtype).expand(batch_size, seq_len + 1, -1)
        x = masks.scatter(1, target.unsqueeze(-1).expand_as(projected), projected)[:, :seq_len]
        x = self.decoder.run_layers(self.decoder.embed(x, None), self.decoder.attention_mask(batch["attention_mask"]))
        pred_positions, valid = batch["pred_positions"], batch["pred_valid"]
        losses = self._token_losses(_gather_rows(x, pred_positions), self.decoder.head_transform,
                                    batch["labels"].gather(1, pred_positions), valid)
        return losses, corruption.gather(1, pred_positions), valid

    def _forward_3ml_cross(self, batch):
        labels, corruption = batch["labels"], batch["corruption"]
        encoded = self._encode_kept(batch)
        # The memory carries the decoder's position embeddings too (at the kept tokens' original positions), so
        # a [MASK] query finds its neighbours through one shared position table rather than by aligning the
        # decoder's table with the encoder's.
        memory = self.decoder.embed(self.decoder_projection(encoded), batch["kept_positions"])
        mask_positions, mask_valid = batch["mask_positions"], batch["mask_valid"]
        queries = self.decoder.mask_embedding.to(memory.dtype).expand(*mask_positions.shape, -1)
        kept_positions = batch["kept_positions"]
        x = self.decoder.run_layers(
            self.decoder.embed(queries, mask_positions),
            self.decoder.attention_mask(mask_valid, mask_positions, mask_positions), memory=memory,
            memory_mask=self.decoder.attention_mask(batch["kept_valid"], mask_positions, kept_positions))
        masked_losses = self._token_losses(x, self.decoder.head_transform, labels.gather(1, mask_positions),
                                           mask_valid)
        # Replaced and unchanged tokens: predicted from the encoder output, no decoder needed.
        kept_pred_index, kept_pred_valid = batch["kept_pred_index"], batch["kept_pred_valid"]
        kept_pred_positions = batch["kept_positions"].gather(1, kept_pred_index)
        kept_losses = self._token_losses(_gather_rows(encoded, kept_pred_index), self.head_transform,
                                         labels.gather(1, kept_pred_positions), kept_pred_valid)
        masked_kinds = torch.full_like(mask_positions, KIND_MASKED, dtype=corruption.dtype)
        return (torch.cat([masked_losses, kept_losses], dim=1),
                torch.cat([masked_kinds, corruption.gather(1, kept_pred_positions)], dim=1),
                torch.cat([mask_valid, kept_pred_valid], dim=1))

    def forward(self, batch: dict[str, torch.Tensor]) -> ModelOutput:
        """``batch``: the ``pipeline.data.masking`` layout (on the model's device). No host-device sync."""
        forward = {"mlm": self._forward_mlm, "3ml-self": self._forward_3ml_self,
                   "3ml-cross": self._forward_3ml_cross}[self.config.architecture]
        losses, kinds, valid = forward(batch)
        kinds_onehot = (kinds.long().unsqueeze(-1) == torch.arange(1, 4, device=kinds.device)) & valid.unsqueeze(-1)
        kinds_onehot = kinds_onehot.float()
        count_by_kind = kinds_onehot.sum(dim=(0, 1))
        loss_sum_by_kind = (losses.detach().unsqueeze(-1) * kinds_onehot).sum(dim=(0, 1))
        loss_sum = losses.sum()
        num_predictions = count_by_kind.sum()
        return ModelOutput(loss=loss_sum / num_predictions.clamp(min=1.0), loss_sum=loss_sum,
                           num_predictions=num_predictions, loss_sum_by_kind=loss_sum_by_kind,
                           count_by_kind=count_by_kind)

    # ------------------------------------------------------------------------------------------------------
    def is_encoder_parameter(self, name: str) -> bool:
        """True for the parameters kept for fine-tuning (see ``encoder_state_dict``)."""
        return name.startswith(("encoder.", "head_transform.", "output_layer."))

    def encoder_state_dict(self) -> dict[str, torch.Tensor]:
        """This rank's shards of the part kept for fine-tuning: embeddings, position embeddings, encoder layers,
        final LayerNorm (pre-LN), the encoder-width MLM head transform (mlm, 3ml-cross) and the output bias
        (and output weight if untied). The decoder, its projection and the ``[MASK]`` embedding are dropped."""
        return {name: tensor for name, tensor in self.state_dict().items()
                if self.is_encoder_parameter(name) and not name.endswith("_extra_state")}


def build_model(config: ModelConfig, init_seed: int = 0) -> PretrainingModel:
    """Builds the model for the current tensor-parallel size (``model.parallel.initialize_model_parallel`` must
    have run). Weights come from a generator seeded with ``init_seed`` -- the same on every rank and for every
    TP size (megatron builds each full weight, then keeps this rank's slice) -- without touching the global RNG
    state that dropout uses."""
    if not parallel_state.model_parallel_is_initialized():
        raise RuntimeError("build_model: call model.parallel.initialize_model_parallel(...) first")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(init_seed)
        return PretrainingModel(config)
