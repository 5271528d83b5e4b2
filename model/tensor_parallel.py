"""How each parameter is split over tensor-parallel ranks, from its name alone (the export and checkpoint tools
read shards from disk without building a model).

A TP-split parameter is cut into ``tp`` equal slices along ``tensor_parallel_dim(name)``. Fused projections are
*strided*: the full ``qkv`` weight is ``[W_q; W_k; W_v]`` and rank r holds ``[W_q^r; W_k^r; W_v^r]`` (stride 3),
``key_value`` likewise with stride 2, so every rank owns whole heads. ``merge_tensor_parallel_shards`` undoes
this; ``split_for_tensor_parallel`` is its inverse (megatron's ``_initialize_affine_weight_cpu`` slicing).
"""

from __future__ import annotations

import torch

# (name suffix, partition dim, stride); first match wins. Everything else is replicated.
_SPLIT_RULES: tuple[tuple[str, int, int], ...] = (
    ("word_embeddings.weight", 0, 1),
    ("output_layer.weight", 0, 1),
    ("output_layer.bias", 0, 1),
    ("qkv.weight", 0, 3), ("qkv.bias", 0, 3),
    ("key_value.weight", 0, 2), ("key_value.bias", 0, 2),
    ("query.weight", 0, 1), ("query.bias", 0, 1),
    ("fc_in.weight", 0, 1), ("fc_in.bias", 0, 1),
    ("attention.out.weight", 1, 1),
    ("fc_out.weight", 1, 1),
)


def _rule(name: str):
    for suffix, dim, stride in _SPLIT_RULES:
        if name.endswith(suffix):
            return dim, stride
    return None


def tensor_parallel_dim(name: str) -> int | None:
    """Partition dim of parameter ``name`` (e.g. ``encoder.layers.0.mlp.fc_out.weight`` -> 1), None if
    replicated."""
    rule = _rule(name)
    return None if rule is None else rule[0]


def tensor_parallel_stride(name: str) -> int:
    """1, or the number of fused blocks (3 for ``qkv``, 2 for ``key_value``) each shard holds a slice of."""
    rule = _rule(name)
    return 1 if rule is None else rule[1]


def merge_tensor_parallel_shards(name: str, shards: list[torch.Tensor]) -> torch.Tensor:
    """The full tensor from the per-rank shards (rank order). Replicated parameters: returns ``shards[0]``."""
    dim = tensor_parallel_dim(name)
    if dim is None or len(shards) == 1:
        return shards[0]
    stride = tensor_parallel_stride(name)
    # Each shard is [block_0^r; ...; block_{stride-1}^r]; the full tensor is [block_0; ...] with block_i =
    # cat_r(block_i^r).
    pieces = [shard.chunk(stride, dim=dim) for shard in shards]
    return torch.cat([torch.cat([p[i] for p in pieces], dim=dim) for i in range(stride)], dim=dim)


def split_for_tensor_parallel(name: str, full: torch.Tensor, rank: int, tp_size: int) -> torch.Tensor:
    """Rank ``rank``'s shard of a full tensor (inverse of ``merge_tensor_parallel_shards``)."""
    dim = tensor_parallel_dim(name)
    if dim is None or tp_size == 1:
        return full
    stride = tensor_parallel_stride(name)
    blocks = full.chunk(stride, dim=dim)
    return torch.cat([block.chunk(tp_size, dim=dim)[rank] for block in blocks], dim=dim)
