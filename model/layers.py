"""Transformer building blocks on megatron-core tensor-parallel layers.

Tensor-parallel split (Megatron-LM): a self-attention block's fused QKV projection and the first FFN layer are
``ColumnParallelLinear`` (output features split, no gather), each rank computes the heads it owns, and the
attention output projection and the second FFN layer are ``RowParallelLinear`` (input features split, one
all-reduce). Everything between those pairs is local to a rank; everything else (layer norms, position
embeddings, residual stream) is replicated. Vocabulary matrices are split by rows (``VocabParallelEmbedding``,
``vocab_parallel_cross_entropy``), so full-vocabulary logits are never gathered.

All activations are batch-first ``[batch, seq, hidden]``; megatron's layers only multiply the last dimension,
and ``sequence_parallel`` stays off (it needs a GPU and the ``[seq, batch]`` layout).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from megatron.core import ModelParallelConfig, parallel_state
from megatron.core.tensor_parallel import (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding,
                                           copy_to_tensor_model_parallel_region, get_cuda_rng_tracker,
                                           vocab_parallel_cross_entropy)
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes

from model.config import ModelConfig


# How the tensor-parallel layers run their forward:
#   "auto"     -- at TP=1 plain torch on the megatron-core layers' own parameters: ``F.linear`` for the linear
#                 layers, ``F.cross_entropy`` for the vocabulary loss (the same math megatron computes, but
#                 visible to torch.compile, which cannot fuse through megatron's custom autograd functions);
#                 at TP>1 megatron-core's forward (its async dgrad all-reduce, vocab-parallel cross-entropy).
#   "megatron" -- megatron-core's forward at every TP size (the reference; ``bench.throughput`` compares them).
LINEAR_FORWARD = "auto"


def runs_plain_torch(tp_size: int) -> bool:
    """Whether a tensor-parallel layer of a ``tp_size``-rank group computes with plain torch (see above)."""
    return tp_size == 1 and LINEAR_FORWARD == "auto"


class _PlainTorchAtTP1:
    """Mixin for a megatron-core linear layer: its forward returns the output tensor alone, computed as
    ``F.linear`` on the layer's own weight and bias at TP=1 and by megatron-core's forward otherwise. The layer
    is still called as a module, so DeepSpeed's ZeRO-3 hooks gather its weight."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.tp_size = parallel_state.get_tensor_model_parallel_world_size()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if runs_plain_torch(self.tp_size):
            return F.linear(x, self.weight, self.bias)
        return super().forward(x)[0]


class ColumnLinear(_PlainTorchAtTP1, ColumnParallelLinear):
    """megatron-core ``ColumnParallelLinear`` (output features split, no gather)."""


class RowLinear(_PlainTorchAtTP1, RowParallelLinear):
    """megatron-core ``RowParallelLinear`` (input features split, one all-reduce, bias added after it)."""


def megatron_config(config: ModelConfig) -> ModelParallelConfig:
    """Megatron's layer config for the current TP size; CPU initialisation = full master weight, then split, so
    a weight starts identical for every TP size."""
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    config.check_tensor_parallel_size(tp_size)
    return ModelParallelConfig(tensor_model_parallel_size=tp_size, use_cpu_initialization=True,
                               perform_initialization=True, params_dtype=torch.float32, sequence_parallel=False)


def normal_init(std: float):
    def init(weight: torch.Tensor) -> torch.Tensor:
        return torch.nn.init.normal_(weight, mean=0.0, std=std)
    return init


def activation_fn(name: str):
    return (lambda x: F.gelu(x)) if name == "gelu" else (lambda x: F.gelu(x, approximate="tanh"))


def key_padding_mask(valid: torch.Tensor) -> torch.Tensor:
    """``[B, Lk]`` bool (True = real key) -> SDPA mask ``[B, 1, 1, Lk]``. A row with no real key (a sequence
    with nothing to attend to, e.g. no <mask> at all) attends to everything instead of producing NaN; its
    outputs are never used."""
    valid = valid | ~valid.any(dim=-1, keepdim=True)
    return valid[:, None, None, :]


def locality_bias(key_mask: torch.Tensor, slope: float, query_positions: torch.Tensor,
                  key_positions: torch.Tensor) -> torch.Tensor:
    """An additive SDPA mask ``[B, 1, Lq, Lk]`` fp32: ``-slope * |p_q - p_k|`` over the tokens' original
    positions (``[B, Lq]`` / ``[B, Lk]``, or ``[L]`` shared by the batch) where ``key_mask`` (``key_padding_mask``)
    lets a key through, -inf where it does not. One slope for every head: ALiBi's distance penalty, added to
    the learned absolute positions rather than replacing them (see ``ModelConfig.decoder_locality_bias``)."""
    distance = (query_positions.unsqueeze(-1) - key_positions.unsqueeze(-2)).abs().float()
    # [B or 1, 1, Lq, Lk] against the key mask's [B, 1, 1, Lk]: the fill broadcasts to [B, 1, Lq, Lk].
    return (distance * -slope).unsqueeze(-3).masked_fill(~key_mask, float("-inf"))


class Attention(torch.nn.Module):
    """Multi-head attention with heads split over TP ranks.

    Self-attention (``cross=False``): fused ``qkv`` = ColumnParallelLinear(d, 3d, stride=3); the full weight is
    ``[W_q; W_k; W_v]`` and stride 3 gives each rank ``[W_q^r; W_k^r; W_v^r]`` (its own heads of each).
    Cross-attention (``cross=True``): ``query`` = ColumnParallelLinear(d, d) on the decoder stream,
    ``key_value`` = ColumnParallelLinear(d, 2d, stride=2) on the memory. ``out`` = RowParallelLinear(d, d).
    """

    def __init__(self, hidden: int, heads: int, dropout: float, init_std: float, mp: ModelParallelConfig,
                 cross: bool = False):
        super().__init__()
        self.tp_size = parallel_state.get_tensor_model_parallel_world_size()
        self.heads_per_rank = heads // self.tp_size
        self.head_dim = hidden // heads
        self.dropout = dropout
        self.cross = cross
        init = normal_init(init_std)
        if cross:
            self.query = ColumnLinear(hidden, hidden, config=mp, init_method=init, bias=True, gather_output=False)
            self.key_value = ColumnLinear(hidden, 2 * hidden, config=mp, init_method=init, bias=True,
                                          gather_output=False, stride=2)
        else:
            self.qkv = ColumnLinear(hidden, 3 * hidden, config=mp, init_method=init, bias=True,
                                    gather_output=False, stride=3)
        self.out = RowLinear(hidden, hidden, config=mp, init_method=init, bias=True, input_is_parallel=True,
                             skip_bias_add=False)

    def _split_heads(self, x: torch.Tensor, parts: int) -> list[torch.Tensor]:
        # [B, L, parts * heads_r * hd] -> parts x [B, heads_r, L, hd]
        b, length, _ = x.shape
        x = x.view(b, length, parts, self.heads_per_rank, self.head_dim).permute(2, 0, 3, 1, 4)
        return list(x.unbind(0))

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor, memory: torch.Tensor | None = None):
        """x ``[B, Lq, d]``; key_mask ``[B, 1, 1, Lk]`` bool (see ``key_padding_mask``) or an additive float mask
        ``[B, 1, Lq, Lk]`` (``locality_bias``); memory ``[B, Lk, d]`` for cross-attention."""
        if self.cross:
            (q,) = self._split_heads(self.query(x), 1)
            k, v = self._split_heads(self.key_value(memory), 2)
        else:
            q, k, v = self._split_heads(self.qkv(x), 3)
        if key_mask.is_floating_point():
            key_mask = key_mask.to(q.dtype)  # SDPA wants an additive mask in the query's dtype (autocast)
        dropout = self.dropout if self.training else 0.0
        # Each TP rank owns different heads: their dropout masks come from the per-TP-rank stream. With one
        # rank there is nothing to tell apart, and the default generator keeps the layer free of RNG-state
        # swaps (which torch.compile cannot trace).
        rng = get_cuda_rng_tracker().fork() if self.tp_size > 1 and dropout > 0 else contextlib.nullcontext()
        with rng:
            context = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask, dropout_p=dropout)
        b, _, length, _ = context.shape
        context = context.transpose(1, 2).reshape(b, length, self.heads_per_rank * self.head_dim)
        return self.out(context)


class MLP(torch.nn.Module):
    """fc_in = ColumnParallelLinear(d, f) -> activation -> fc_out = RowParallelLinear(f, d)."""

    def __init__(self, hidden: int, ffn: int, activation: str, init_std: float, mp: ModelParallelConfig):
        super().__init__()
        init = normal_init(init_std)
        self.fc_in = ColumnLinear(hidden, ffn, config=mp, init_method=init, bias=True, gather_output=False)
        self.fc_out = RowLinear(ffn, hidden, config=mp, init_method=init, bias=True, input_is_parallel=True,
                                skip_bias_add=False)
        self.act = activation_fn(activation)

    def forward(self, x):
        return self.fc_out(self.act(self.fc_in(x)))


class TransformerLayer(torch.nn.Module):
    """Self-attention [+ cross-attention] + MLP, each with dropout and a residual, pre-LN or post-LN.

    post-LN (BERT): ``x = LN(x + drop(sublayer(x)))``; pre-LN: ``x = x + drop(sublayer(LN(x)))``. With
    ``cross=True`` (the 3MLcross decoder) a cross-attention sub-layer to ``memory`` sits between the two.
    """

    def __init__(self, hidden: int, ffn: int, heads: int, config: ModelConfig, mp: ModelParallelConfig,
                 cross: bool = False):
        super().__init__()
        eps = config.layernorm_eps
        self.pre_ln = config.pre_ln
        self.hidden_dropout = config.hidden_dropout
        self.self_attention = Attention(hidden, heads, config.attention_dropout, config.init_std, mp)
        self.self_attention_layernorm = torch.nn.LayerNorm(hidden, eps=eps)
        if cross:
            self.cross_attention = Attention(hidden, heads, config.attention_dropout, config.init_std, mp, cross=True)
            self.cross_attention_layernorm = torch.nn.LayerNorm(hidden, eps=eps)
        else:
            self.cross_attention = None
        self.mlp = MLP(hidden, ffn, config.activation, config.init_std, mp)
        self.mlp_layernorm = torch.nn.LayerNorm(hidden, eps=eps)

    def _sublayer(self, x, layernorm, fn):
        # Replicated activations: the default generator, identical on all TP ranks.
        if self.pre_ln:
            return x + F.dropout(fn(layernorm(x)), self.hidden_dropout, self.training)
        return layernorm(x + F.dropout(fn(x), self.hidden_dropout, self.training))

    def forward(self, x, key_mask, memory=None, memory_mask=None):
        x = self._sublayer(x, self.self_attention_layernorm, lambda h: self.self_attention(h, key_mask))
        if self.cross_attention is not None:
            x = self._sublayer(x, self.cross_attention_layernorm,
                               lambda h: self.cross_attention(h, memory_mask, memory=memory))
        return self._sublayer(x, self.mlp_layernorm, self.mlp)


class TransformerStack(torch.nn.Module):
    """``layers`` plus, for pre-LN, the ``final_layernorm`` after them (base of the encoder and decoder, so
    their parameters are named ``encoder.layers.L...`` / ``decoder.layers.L...``)."""

    def __init__(self, num_layers: int, hidden: int, ffn: int, heads: int, config: ModelConfig,
                 mp: ModelParallelConfig, cross: bool = False):
        super().__init__()
        self.layers = torch.nn.ModuleList(
            TransformerLayer(hidden, ffn, heads, config, mp, cross=cross) for _ in range(num_layers))
        self.final_layernorm = torch.nn.LayerNorm(hidden, eps=config.layernorm_eps) if config.pre_ln else None

    def run_layers(self, x, key_mask, memory=None, memory_mask=None):
        for layer in self.layers:
            x = layer(x, key_mask, memory, memory_mask)
        return self.final_layernorm(x) if self.final_layernorm is not None else x


class HeadTransform(torch.nn.Module):
    """The prediction layer's first FC (RoBERTa ``lm_head.dense``/``layer_norm``): dense ``in_width -> d_en``,
    activation, LayerNorm. With ``in_width = d_de`` it is the paper's projection back to the encoder width
    (Appendix D: phi'_Pred = 2nr(d_de d_en + d_en |V|)). Replicated (small; the vocabulary GEMM is the split
    part)."""

    def __init__(self, in_width: int, config: ModelConfig):
        super().__init__()
        self.dense = torch.nn.Linear(in_width, config.hidden_size)
        self.layernorm = torch.nn.LayerNorm(config.hidden_size, eps=config.layernorm_eps)
        self.act = activation_fn(config.activation)

    def forward(self, x):
        return self.layernorm(self.act(self.dense(x)))


class OutputLayer(torch.nn.Module):
    """Vocabulary projection and the per-token cross-entropy, split over TP ranks by vocabulary rows.

    Kept by hand around megatron-core's ``vocab_parallel_cross_entropy``: the projection reuses the tied,
    vocab-parallel word-embedding shard plus a bias, runs only at the predicted positions, and masks the padding
    rows; megatron-core's GPT output layer does none of that for an encoder's sparse prediction head.

    ``logits_r = h @ W_r^T + bias_r`` for this rank's rows ``W_r`` of the (tied) word-embedding matrix; the loss
    comes from ``vocab_parallel_cross_entropy`` (all-reduces of max / sum-exp / target logit), never a gathered
    ``[N, |V|]``. Rows past ``vocab_size`` (padding to ``padded_vocab_size``) get logit -inf.
    """

    def __init__(self, config: ModelConfig, mp: ModelParallelConfig):
        super().__init__()
        self.tp_size = tp = parallel_state.get_tensor_model_parallel_world_size()
        rank = parallel_state.get_tensor_model_parallel_rank()
        rows = config.padded_vocab_size // tp
        self.vocab_start = rank * rows
        if config.tie_embeddings:
            self.weight = None
        else:
            self.weight = torch.nn.Parameter(torch.empty(rows, config.hidden_size))
            # Same master-weight-then-split as the embedding (identical for every TP size).
            full = torch.empty(config.padded_vocab_size, config.hidden_size)
            torch.nn.init.normal_(full, 0.0, config.init_std)
            with torch.no_grad():
                self.weight.copy_(full[self.vocab_start:self.vocab_start + rows])
            set_tensor_model_parallel_attributes(self.weight, True, 0, 1)
        self.bias = torch.nn.Parameter(torch.zeros(rows))
        set_tensor_model_parallel_attributes(self.bias, True, 0, 1)
        # Static per-rank mask of padded vocabulary rows (None when this rank has none).
        has_padding = self.vocab_start + rows > config.vocab_size
        padded = torch.arange(self.vocab_start, self.vocab_start + rows) >= config.vocab_size
        self.register_buffer("padded_rows", padded if has_padding else None, persistent=False)

    def forward(self, hidden: torch.Tensor, targets: torch.Tensor, embedding_weight: torch.Tensor) -> torch.Tensor:
        """hidden ``[B, N, d_en]`` (replicated), targets ``[B, N]`` (valid ids) -> per-token loss ``[B, N]`` fp32,
        the same on every TP rank."""
        weight = embedding_weight if self.weight is None else self.weight
        single_rank = runs_plain_torch(self.tp_size)
        if not single_rank:
            # Identity forward; all-reduce of the input gradient across TP ranks in backward.
            hidden = copy_to_tensor_model_parallel_region(hidden)
        logits = F.linear(hidden, weight, self.bias)
        if self.padded_rows is not None:
            logits = logits.masked_fill(self.padded_rows, float("-inf"))
        if single_rank:
            # The whole vocabulary is here: torch's fused log-softmax + NLL keeps one [N, V] fp32 buffer where
            # megatron's vocab-parallel version keeps several (this head was ~4x its FLOPs' share of a step).
            return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none").view_as(targets)
        return vocab_parallel_cross_entropy(logits.float(), targets)


class WordEmbedding(VocabParallelEmbedding):
    """``VocabParallelEmbedding`` over ``padded_vocab_size`` rows (normal(0, init_std) master weight, split)."""

    def __init__(self, config: ModelConfig, mp: ModelParallelConfig, width: int):
        super().__init__(config.padded_vocab_size, width, init_method=normal_init(config.init_std), config=mp)


def compile_layers(model: torch.nn.Module) -> int:
    """``torch.compile`` in place (regional compilation) every ``TransformerLayer`` and ``HeadTransform`` of
    ``model`` and, where it runs plain torch (TP=1), its ``OutputLayer`` (megatron's collectives otherwise);
    returns how many modules. The layers of a stack share their code, so the encoder costs one compilation and
    the decoder one more (its width differs), not one per layer. Parameters, their names and ``state_dict`` are
    unchanged, so checkpoints do not depend on it. Shapes are static (``dynamic=False``): every training micro
    batch has one shape (``pipeline.data.masking``); evaluation batches of another size compile once more."""
    kinds = (TransformerLayer, HeadTransform)
    modules = [m for m in model.modules()
               if isinstance(m, kinds) or (isinstance(m, OutputLayer) and runs_plain_torch(m.tp_size))]
    for module in modules:
        module.compile(dynamic=False)
    return len(modules)
