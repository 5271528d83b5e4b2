"""Models for 3ML pre-training: ``mlm`` (RoBERTa), ``3ml-self`` and ``3ml-cross`` on megatron-core TP layers.

Public API::

    from model import ModelConfig, build_model, ModelOutput
    from model.parallel import initialize_model_parallel, MegatronMpuForDeepSpeed
    initialize_model_parallel(tensor_parallel_size, seed)   # after torch.distributed.init_process_group
    model = build_model(ModelConfig.preset("base", "3ml-self"), init_seed=0)
    out = model(batch)            # ModelOutput(loss, loss_sum, num_predictions, loss_sum_by_kind, count_by_kind)
    model.encoder_state_dict()    # the part kept for fine-tuning (decoder dropped)
"""

from model.architectures import ModelOutput, PretrainingModel, TransformerEncoder, build_model
from model.config import ARCHITECTURES, ModelConfig
from model.tensor_parallel import merge_tensor_parallel_shards, split_for_tensor_parallel, tensor_parallel_dim

__all__ = ["ARCHITECTURES", "ModelConfig", "ModelOutput", "PretrainingModel", "TransformerEncoder", "build_model",
           "merge_tensor_parallel_shards", "split_for_tensor_parallel", "tensor_parallel_dim"]
