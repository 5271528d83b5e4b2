"""Models for 3ML pre-training: ``mlm`` (RoBERTa), ``3ml-self`` and ``3ml-cross`` on megatron-core TP layers.

Public API::

    from model import ModelConfig, build_model, ModelOutput
    from model.parallel import initialize_model_parallel, MegatronMpuForDeepSpeed
    initialize_model_parallel(tensor_parallel_size, seed)   # after torch.distributed.init_process_group
    model = build_model(ModelConfig.preset("base", "3ml-self"), init_seed=0)
    out = model(batch)            # ModelOutput(loss, loss_sum, num_predictions, loss_sum_by_kind, count_by_kind)
    model.encoder_state_dict()    # the part kept for fine-tuning (decoder dropped)

``model.config`` is light; the rest imports megatron-core (slow), so it is loaded on first use.
"""

from model.config import ARCHITECTURES, ModelConfig

_LAZY = {
    "ModelOutput": "model.architectures", "PretrainingModel": "model.architectures",
    "TransformerEncoder": "model.architectures", "build_model": "model.architectures",
    "merge_tensor_parallel_shards": "model.tensor_parallel", "split_for_tensor_parallel": "model.tensor_parallel",
    "tensor_parallel_dim": "model.tensor_parallel",
}

__all__ = ["ARCHITECTURES", "ModelConfig", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'model' has no attribute {name!r}")
