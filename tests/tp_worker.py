"""Helpers for the model tests: a deterministic synthetic batch, and the body of the 2-process tensor-parallel
test (run as ``python tests/tp_worker.py RANK WORLD STORE_FILE OUT_FILE``; rank 0 writes the results).

Each process joins a gloo group of 2 through a FileStore. For TP=1 (each process alone: data parallelism of 2)
and TP=2 (one TP group of 2) it builds every architecture, pre-LN and post-LN, with dropout off, runs one
forward/backward on the same batch and gathers the full (merged) parameters and gradients. With dropout on it
records losses over several seeds, whether replicated-stream draws agree across the TP ranks and TP-stream draws
differ, and an RNG save/restore replay.
"""

from __future__ import annotations

import sys

import numpy as np
import torch

from pipeline.data.batch import SpecialTokens
from pipeline.data.masking import Masker, MaskingConfig, collate

SPECIAL = SpecialTokens(bos=0, pad=1, eos=2, unk=3, mask=4)
VOCAB = 300
ARCH_LN = [(arch, pre_ln) for arch in ("mlm", "3ml-self", "3ml-cross") for pre_ln in (False, True)]
# Further exact TP=2 == TP=1 cases: the untied output projection, and the 3ML decoders with a locality bias.
EXTRA_EXACT = [("mlm-untied", False), ("3ml-self-local", False), ("3ml-cross-local", True)]


def exact_case_config(arch: str, pre_ln: bool):
    if arch == "mlm-untied":
        return tiny_config("mlm", pre_ln, tie_embeddings=False)
    if arch.endswith("-local"):
        return tiny_config(arch.removesuffix("-local"), pre_ln, decoder_locality_bias=0.7)
    return tiny_config(arch, pre_ln)


def make_batch(batch_size: int = 4, seq_len: int = 64, rate: float = 0.4, seed: int = 0, n_pad_last: int = 14,
               pad_multiple: int = 8, strategy: str = "80-10-10") -> dict[str, torch.Tensor]:
    """Packed-looking sequences (``<s> ... </s>``, ids 5..VOCAB-1), the last one padded, masked by the real
    ``Masker`` and collated into the real batch layout."""
    config = MaskingConfig(rate=rate, seed=seed, pad_multiple=pad_multiple, strategy=strategy)
    masker = Masker(config, SPECIAL, VOCAB)
    rng = np.random.default_rng(seed)
    samples = []
    for index in range(batch_size):
        tokens = rng.integers(5, VOCAB, size=seq_len)
        tokens[0] = SPECIAL.bos
        tokens[-1] = SPECIAL.eos
        if index == batch_size - 1 and n_pad_last:
            tokens[seq_len - n_pad_last:] = SPECIAL.pad
            tokens[seq_len - n_pad_last - 1] = SPECIAL.eos
        samples.append(masker(tokens, sample_index=index))
    return collate(samples, config, SPECIAL.pad)


def tiny_config(architecture: str, pre_ln: bool, dropout: float = 0.0, **overrides):
    from model import ModelConfig
    values = dict(vocab_size=VOCAB, pre_ln=pre_ln, hidden_dropout=dropout, attention_dropout=dropout)
    values.update(overrides)
    return ModelConfig.preset("tiny", architecture, **values)


def _gather_full(model, what: str) -> dict[str, torch.Tensor]:
    """Full tensors (params or grads) merged over the TP group; replicated ones checked equal across ranks."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from model import merge_tensor_parallel_shards, tensor_parallel_dim

    group = parallel_state.get_tensor_model_parallel_group()
    tp = parallel_state.get_tensor_model_parallel_world_size()
    full = {}
    for name, param in model.named_parameters():
        tensor = (param.detach() if what == "param" else param.grad).contiguous()
        shards = [torch.empty_like(tensor) for _ in range(tp)]
        dist.all_gather(shards, tensor, group=group)
        if tensor_parallel_dim(name) is None:
            for other in shards[1:]:
                if not torch.equal(other, shards[0]):
                    raise AssertionError(f"replicated {what} {name} differs across TP ranks")
        full[name] = merge_tensor_parallel_shards(name, shards)
    return full


def _partition_attributes_match(model) -> list[str]:
    """Names whose megatron TP attributes disagree with ``tensor_parallel_dim``/stride (expect none)."""
    from model.tensor_parallel import tensor_parallel_dim, tensor_parallel_stride

    wrong = []
    for name, param in model.named_parameters():
        is_split = bool(getattr(param, "tensor_model_parallel", False))
        dim = tensor_parallel_dim(name)
        if is_split != (dim is not None):
            wrong.append(name)
        elif is_split and (param.partition_dim != dim or param.partition_stride != tensor_parallel_stride(name)):
            wrong.append(name)
    return wrong


def run(rank: int, world: int, store_file: str) -> dict:
    import torch.distributed as dist
    from megatron.core import parallel_state

    from model import build_model
    from model.parallel import (get_rng_tracker, get_rng_tracker_states, initialize_model_parallel,
                                seed_model_parallel_rng, set_rng_tracker_states)

    dist.init_process_group("gloo", init_method=f"file://{store_file}", rank=rank, world_size=world)
    batch = make_batch()
    results: dict = {"exact": {}, "dropout_losses": {}, "attributes_wrong": []}
    for tp in (1, 2):
        initialize_model_parallel(tp, seed=123)
        for arch, pre_ln in ARCH_LN + EXTRA_EXACT:
            model = build_model(exact_case_config(arch, pre_ln), init_seed=7)
            if tp == 2:
                results["attributes_wrong"] += _partition_attributes_match(model)
            params = _gather_full(model, "param")
            out = model(batch)
            out.loss.backward()
            grads = _gather_full(model, "grad")
            losses = [torch.empty(()) for _ in range(dist.get_world_size())]
            dist.all_gather(losses, out.loss.detach())
            results["exact"][(tp, arch, pre_ln)] = dict(
                loss=out.loss.detach(), params=params, grads=grads, loss_sum_by_kind=out.loss_sum_by_kind,
                count_by_kind=out.count_by_kind, losses_all_ranks=torch.stack(losses))

        # Dropout on: per-seed losses (train mode), eval-mode loss, and a save/restore replay.
        for arch in ("mlm", "3ml-self", "3ml-cross"):
            model = build_model(tiny_config(arch, pre_ln=True, dropout=0.3), init_seed=7)
            per_seed, rank_equal = [], True
            for seed in range(12):
                seed_model_parallel_rng(1000 + seed)
                loss = model(batch).loss.detach()
                gathered = [torch.empty(()) for _ in range(tp)]
                dist.all_gather(gathered, loss, group=parallel_state.get_tensor_model_parallel_group())
                rank_equal &= all(torch.equal(g, gathered[0]) for g in gathered)
                per_seed.append(loss)
            states = get_rng_tracker_states()
            first = model(batch).loss.detach()
            set_rng_tracker_states(states)
            replay = model(batch).loss.detach()
            model.eval()
            eval_loss = model(batch).loss.detach()
            results["dropout_losses"][(tp, arch)] = dict(
                per_seed=torch.stack(per_seed), tp_ranks_equal=rank_equal, replay_equal=torch.equal(first, replay),
                eval_loss=eval_loss)

        # Raw RNG streams: the default one must agree across TP ranks, the model-parallel one must not.
        group = parallel_state.get_tensor_model_parallel_group()
        default_draw = torch.rand(8)
        with get_rng_tracker().fork():
            tp_draw = torch.rand(8)
        draws = {}
        for key, draw in (("default", default_draw), ("model_parallel", tp_draw)):
            gathered = [torch.empty(8) for _ in range(tp)]
            dist.all_gather(gathered, draw, group=group)
            draws[key] = torch.stack(gathered)
        results[("draws", tp)] = draws
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()
    return results


if __name__ == "__main__":
    rank_arg, world_arg, store_arg, out_arg = sys.argv[1:5]
    result = run(int(rank_arg), int(world_arg), store_arg)
    if int(rank_arg) == 0:
        torch.save(result, out_arg)
