"""Export a pre-training checkpoint to Hugging Face: the encoder as RoBERTa, optionally the whole 3ML model.

    python -m pipeline export CKPT --output HF_DIR [--tag step_00001000] [--with-decoder] [--tokenizer T]

``CKPT`` is a run directory (``--save`` of run_pretrain.py), its ``checkpoints/`` directory or one checkpoint tag
directory; without ``--tag`` the newest intact checkpoint is used (``pipeline.training.checkpoint.find_resume_point``),
and every newer one it skips is named on stderr with the reason.

Weights, for any ZeRO stage and tensor-parallel (TP) size:

* ZeRO 1-3: DeepSpeed's own ``zero_to_fp32`` consolidates the fp32 master weights of the data-parallel
  partitions. It reads every ``*_model_states.pt`` / ``*_optim_states.pt`` of one directory, which for TP > 1
  mixes the model-parallel ranks, so it is run once per TP rank on a view directory holding only that rank's
  files (``*mp_rank_XX_*``). ZeRO 0: the module weights of ``mp_rank_XX_model_states.pt`` (already fp32 masters
  unless the run was fp16/bf16, in which case they are upcast).
* The TP shards are merged with ``model.merge_tensor_parallel_shards`` (partition dim and fused-QKV stride per
  parameter name).

Output (written to a staging directory ``.NAME.tmp-PID`` next to it and published in one rename by
``pipeline.io.publish_directory``: an existing export is replaced only by a complete one, and survives any failure;
files get the usual permissions of the umask):

* ``model.safetensors`` + ``config.json``: ``roberta`` (post-LN encoders) or ``roberta-prelayernorm`` (pre-LN),
  the encoder only (the 3ML decoder is dropped, as for fine-tuning). ``RobertaForMaskedLM`` weights, with the
  MLM head (``lm_head``), for ``mlm`` and ``3ml-cross`` whose encoder-width head transform is the RoBERTa LM head;
  ``RobertaModel`` weights for ``3ml-self`` (its prediction layer reads the decoder, so the encoder has no MLM
  head of its own). Hugging Face RoBERTa numbers positions from ``pad_token_id + 1``: our position row ``i``
  becomes HF row ``i + pad_token_id + 1`` (rows below are zero) and ``max_position_embeddings`` grows by
  ``pad_token_id + 1``; RoBERTa's token-type embedding is a single zero row (``type_vocab_size=1``). Padded
  vocabulary rows are cut to ``vocab_size``.
* the tokenizer files (``tokenizer.json``, ``tokenizer_config.json``, ...) of the tokenizer the checkpoint was
  trained with (its sha256 is checked against the checkpoint's fingerprint).
* ``export_info.json``: source checkpoint, step, fingerprints.
* with ``--with-decoder``: ``3ml/model.safetensors`` + ``3ml/config.json`` (``ModelConfig``), the full TP-merged
  pre-training model, for mask infilling; ``load_full_model(HF_DIR)`` rebuilds it (TP = 1).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Sequence

import torch

from pipeline.errors import PipelineError, exit_on_data_error
from pipeline.io import default_file_mode, library_os_error, make_staging_dir, naming_path, publish_directory

FULL_MODEL_SUBDIR = "3ml"
EXPORT_INFO_FILE = "export_info.json"


class ExportError(PipelineError):
    """A checkpoint that cannot be exported; ``str()`` is one line naming the file."""


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


# ------------------------------------------------------------------------------------ reading the checkpoint

def locate_checkpoint(path: str | os.PathLike, tag: str | None = None):
    """The ``ResumePoint`` (checkpoints dir + tag) to export: ``--tag`` in ``path``, else the newest intact one."""
    from pipeline.training.checkpoint import CheckpointError, checkpoints_dir, find_resume_point

    path = Path(path)
    if not path.exists():
        raise ExportError(f"{path}: no such checkpoint or run directory")
    try:
        if tag is not None:
            base = checkpoints_dir(path) if checkpoints_dir(path).is_dir() else path
            return find_resume_point(base / tag)
        point = find_resume_point(path)
    except CheckpointError as error:
        raise ExportError(str(error)) from None
    if point is None:
        raise ExportError(f"{path}: no checkpoint found (expected a run directory with checkpoints/latest)")
    for reason in point.skipped:  # a fallback said out loud, as training's resume does
        print(f"warning: skipping a damaged checkpoint: {reason}; exporting {point.tag_dir} instead",
              file=sys.stderr)
    return point


def _zero_stage(tag_dir: Path, run_config: dict) -> int:
    parallel = run_config.get("config", {}).get("parallel", {})
    if "zero_stage" in parallel:
        return int(parallel["zero_stage"])
    return 1 if any(tag_dir.glob("*zero_pp_rank_*_optim_states.pt")) else 0


def _tp_size(tag_dir: Path, run_config: dict) -> int:
    world = run_config.get("world") or {}
    if "tensor_parallel_size" in world:
        return int(world["tensor_parallel_size"])
    ranks = {p.name.split("mp_rank_")[1][:2] for p in tag_dir.glob("*mp_rank_*_model_states.pt")}
    return max(len(ranks), 1)


def _rank_files(tag_dir: Path, tp_rank: int) -> list[Path]:
    return sorted(tag_dir.glob(f"*mp_rank_{tp_rank:02d}_*states.pt"))


def _consolidate_zero(tag_dir: Path, tp_rank: int) -> dict[str, torch.Tensor]:
    """fp32 weights of one TP rank through DeepSpeed's zero_to_fp32 (on a view holding only this rank's files)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    files = _rank_files(tag_dir, tp_rank)
    if not any(f.name.endswith("_optim_states.pt") for f in files):
        raise ExportError(f"{tag_dir}: no *mp_rank_{tp_rank:02d}_optim_states.pt for tensor-parallel rank {tp_rank}")
    with tempfile.TemporaryDirectory(prefix="export-view-") as view:
        view_tag = Path(view) / "tag"
        view_tag.mkdir()
        for f in files:
            os.symlink(f.resolve(), view_tag / f.name)
        try:
            state = get_fp32_state_dict_from_zero_checkpoint(view, tag="tag")
        except (FileNotFoundError, ValueError, KeyError, RuntimeError) as error:
            raise ExportError(f"{tag_dir}: zero_to_fp32 failed for tensor-parallel rank {tp_rank} "
                              f"({_first_line(error)})") from None
    return {name: tensor.float() for name, tensor in state.items()}


def _module_weights(tag_dir: Path, tp_rank: int) -> dict[str, torch.Tensor]:
    path = tag_dir / f"mp_rank_{tp_rank:02d}_model_states.pt"
    if not path.is_file():
        raise ExportError(f"{path}: missing (tensor-parallel rank {tp_rank} of a ZeRO-0 checkpoint)")
    try:
        module = torch.load(path, map_location="cpu", weights_only=False)["module"]
    except Exception as error:  # torch raises many types for a damaged file
        raise ExportError(f"{path}: cannot read ({_first_line(error)})") from None
    return {name: t.float() if t.is_floating_point() else t for name, t in module.items()
            if isinstance(t, torch.Tensor)}


def load_merged_state_dict(tag_dir: str | os.PathLike, run_config: dict | None = None) -> dict[str, torch.Tensor]:
    """The full (TP-merged, ZeRO-consolidated) fp32 state dict of a checkpoint tag directory, with the
    parameter names of ``model.PretrainingModel``."""
    from model import merge_tensor_parallel_shards
    from pipeline.training.checkpoint import read_run_config

    tag_dir = Path(tag_dir)
    run_config = read_run_config(tag_dir) if run_config is None else run_config
    stage = _zero_stage(tag_dir, run_config)
    tp_size = _tp_size(tag_dir, run_config)
    shards = [(_consolidate_zero(tag_dir, r) if stage >= 1 else _module_weights(tag_dir, r)) for r in range(tp_size)]
    names = list(shards[0])
    for r, shard in enumerate(shards[1:], start=1):
        if set(shard) != set(names):
            raise ExportError(f"{tag_dir}: tensor-parallel rank {r} holds different parameters than rank 0")
    return {name: merge_tensor_parallel_shards(name, [shard[name] for shard in shards]).contiguous()
            for name in names if not name.endswith("_extra_state")}


# ------------------------------------------------------------------------------------------ the HF mapping

def hf_model_type(config) -> str:
    return "roberta-prelayernorm" if config.pre_ln else "roberta"


def has_mlm_head(config) -> bool:
    """The encoder-width head transform exists (mlm, 3ml-cross): it is RoBERTa's ``lm_head``."""
    return config.architecture != "3ml-self"


def hf_config(config, tokenizer_ids: dict | None = None):
    """A ``RobertaConfig`` / ``RobertaPreLayerNormConfig`` equivalent to the encoder of ``config``."""
    from transformers import RobertaConfig, RobertaPreLayerNormConfig

    cls = RobertaPreLayerNormConfig if config.pre_ln else RobertaConfig
    ids = tokenizer_ids or {}
    architecture = ("RobertaPreLayerNorm" if config.pre_ln else "Roberta") + \
        ("ForMaskedLM" if has_mlm_head(config) else "Model")
    return cls(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads, intermediate_size=config.ffn_size,
        hidden_act="gelu" if config.activation == "gelu" else "gelu_pytorch_tanh",
        hidden_dropout_prob=config.hidden_dropout, attention_probs_dropout_prob=config.attention_dropout,
        # HF RoBERTa positions start at pad_token_id + 1 (see module docstring).
        max_position_embeddings=config.max_positions + config.pad_token_id + 1,
        type_vocab_size=1, initializer_range=config.init_std, layer_norm_eps=config.layernorm_eps,
        pad_token_id=config.pad_token_id, bos_token_id=ids.get("bos", 0), eos_token_id=ids.get("eos", 2),
        tie_word_embeddings=config.tie_embeddings, architectures=[architecture])


def encoder_to_hf(state: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    """Our merged state dict -> Hugging Face RoBERTa(-PreLayerNorm) tensor names (encoder [+ MLM head])."""
    prefix = "roberta_prelayernorm." if config.pre_ln else "roberta."
    d, vocab, pad = config.hidden_size, config.vocab_size, config.pad_token_id

    def get(name: str) -> torch.Tensor:
        if name not in state:
            raise ExportError(f"checkpoint lacks parameter {name}")
        return state[name]

    out: dict[str, torch.Tensor] = {}
    emb = "encoder.embeddings."
    out[prefix + "embeddings.word_embeddings.weight"] = get(emb + "word_embeddings.weight")[:vocab]
    ours = get(emb + "position_embeddings.weight")
    positions = ours.new_zeros(config.max_positions + pad + 1, d)
    positions[pad + 1:] = ours
    out[prefix + "embeddings.position_embeddings.weight"] = positions
    out[prefix + "embeddings.token_type_embeddings.weight"] = ours.new_zeros(1, d)
    out[prefix + "embeddings.LayerNorm.weight"] = get(emb + "layernorm.weight")
    out[prefix + "embeddings.LayerNorm.bias"] = get(emb + "layernorm.bias")
    for layer in range(config.num_layers):
        src, dst = f"encoder.layers.{layer}.", f"{prefix}encoder.layer.{layer}."
        for kind in ("weight", "bias"):
            # The merged fused projection is [W_q; W_k; W_v] (model/tensor_parallel.py).
            q, k, v = get(src + f"self_attention.qkv.{kind}").chunk(3, dim=0)
            out[dst + f"attention.self.query.{kind}"] = q
            out[dst + f"attention.self.key.{kind}"] = k
            out[dst + f"attention.self.value.{kind}"] = v
            out[dst + f"attention.output.dense.{kind}"] = get(src + f"self_attention.out.{kind}")
            out[dst + f"intermediate.dense.{kind}"] = get(src + f"mlp.fc_in.{kind}")
            out[dst + f"output.dense.{kind}"] = get(src + f"mlp.fc_out.{kind}")
            if config.pre_ln:  # LN before each sub-layer
                out[dst + f"attention.LayerNorm.{kind}"] = get(src + f"self_attention_layernorm.{kind}")
                out[dst + f"intermediate.LayerNorm.{kind}"] = get(src + f"mlp_layernorm.{kind}")
            else:  # LN after each residual add
                out[dst + f"attention.output.LayerNorm.{kind}"] = get(src + f"self_attention_layernorm.{kind}")
                out[dst + f"output.LayerNorm.{kind}"] = get(src + f"mlp_layernorm.{kind}")
    if config.pre_ln:
        out[prefix + "LayerNorm.weight"] = get("encoder.final_layernorm.weight")
        out[prefix + "LayerNorm.bias"] = get("encoder.final_layernorm.bias")
    if has_mlm_head(config):
        out["lm_head.dense.weight"] = get("head_transform.dense.weight")
        out["lm_head.dense.bias"] = get("head_transform.dense.bias")
        out["lm_head.layer_norm.weight"] = get("head_transform.layernorm.weight")
        out["lm_head.layer_norm.bias"] = get("head_transform.layernorm.bias")
        bias = get("output_layer.bias")[:vocab]
        out["lm_head.bias"] = bias
        out["lm_head.decoder.bias"] = bias
        if not config.tie_embeddings:
            out["lm_head.decoder.weight"] = get("output_layer.weight")[:vocab]
    # safetensors refuses tensors that share memory: give each its own storage.
    return {name: tensor.contiguous().clone() for name, tensor in out.items()}


# ------------------------------------------------------------------------------------------------- writing

def _tokenizer_path(run_config: dict, override: str | None) -> Path | None:
    if override:
        return Path(override)
    data = run_config.get("config", {}).get("data", {})
    meta_tokenizer = (run_config.get("dataset_meta") or {}).get("tokenizer", {})
    for candidate in (data.get("tokenizer"), meta_tokenizer.get("file")):
        if candidate:
            return Path(candidate)
    return None


def _write_tokenizer(tokenizer_path: Path, expected_sha256: str | None, output: Path, max_length: int) -> dict:
    from pipeline.errors import DataError
    from pipeline.data.tokenizer import load_tokenizer, special_tokens, tokenizer_fingerprint

    try:
        fingerprint = tokenizer_fingerprint(tokenizer_path)
        if expected_sha256 and fingerprint != expected_sha256:
            raise ExportError(f"{tokenizer_path}: not the tokenizer this checkpoint was trained with (sha256 "
                              f"{fingerprint[:12]}..., checkpoint {expected_sha256[:12]}...); pass --tokenizer")
        tokenizer = load_tokenizer(tokenizer_path)
    except DataError as error:
        raise ExportError(str(error)) from None
    tokenizer.model_max_length = max_length
    try:
        tokenizer.save_pretrained(str(output))
    except OSError:
        raise
    except Exception as error:  # the Rust tokenizers library reports an I/O failure as a plain Exception
        os_error = library_os_error(error, output / "tokenizer.json")
        if os_error is None:
            raise
        raise os_error from None
    ids = special_tokens(tokenizer)
    return {"bos": ids.bos, "pad": ids.pad, "eos": ids.eos, "unk": ids.unk, "mask": ids.mask,
            "sha256": fingerprint}


def export_checkpoint(checkpoint: str | os.PathLike, output: str | os.PathLike, tag: str | None = None,
                      with_decoder: bool = False, tokenizer: str | None = None, overwrite: bool = False) -> Path:
    """Writes the Hugging Face directory ``output`` (see module docstring); returns its path."""
    from model import ModelConfig
    from pipeline.training.checkpoint import CheckpointError, read_run_config

    point = locate_checkpoint(checkpoint, tag)
    tag_dir = point.tag_dir
    output = Path(output)
    if output.exists() and not overwrite:
        raise ExportError(f"{output}: already exists (pass --overwrite to replace it)")
    try:
        run_config = read_run_config(tag_dir)
        config = ModelConfig.from_dict(run_config["config"]["model"])
    except CheckpointError as error:
        raise ExportError(str(error)) from None
    except (KeyError, TypeError, ValueError) as error:
        raise ExportError(f"{tag_dir}/run_config.json: no usable model config ({_first_line(error)})") from None

    state = load_merged_state_dict(tag_dir, run_config)
    hf_state = encoder_to_hf(state, config)

    with naming_path(output.parent):
        output.parent.mkdir(parents=True, exist_ok=True)
    staging = make_staging_dir(output)
    try:
        with naming_path(staging):
            tokenizer_info = None
            tokenizer_path = _tokenizer_path(run_config, tokenizer)
            if tokenizer_path is not None:
                tokenizer_info = _write_tokenizer(tokenizer_path, run_config.get("tokenizer_fingerprint"), staging,
                                                  config.max_positions)
            else:
                print(f"warning: {tag_dir}: no tokenizer path recorded; exporting without tokenizer files "
                      "(pass --tokenizer)", file=sys.stderr)
            hf_config(config, tokenizer_info).save_pretrained(str(staging))
            _save_safetensors(hf_state, staging / "model.safetensors")
            if with_decoder:
                full_dir = staging / FULL_MODEL_SUBDIR
                full_dir.mkdir()
                _save_safetensors({name: tensor.contiguous().clone() for name, tensor in state.items()},
                                  full_dir / "model.safetensors")
                (full_dir / "config.json").write_text(config.to_json() + "\n")
            info = {"source": str(tag_dir.resolve()), "step": run_config.get("step"),
                    "consumed_samples": run_config.get("consumed_samples"),
                    "zero_stage": _zero_stage(tag_dir, run_config),
                    "tensor_parallel_size": _tp_size(tag_dir, run_config),
                    "architecture": config.architecture, "model_type": hf_model_type(config),
                    "mlm_head": has_mlm_head(config), "with_decoder": with_decoder,
                    "tokenizer_sha256": (tokenizer_info or {}).get("sha256"),
                    "dataset_fingerprint": run_config.get("dataset_fingerprint")}
            (staging / EXPORT_INFO_FILE).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
        # --overwrite: the old output (directory or file) is replaced in the same single rename.
        publish_directory(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)  # never hides the first error
        raise
    return output


def _save_safetensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """safetensors' save_file with the file mode of the umask (it creates files 0600, which a cluster's teammates
    cannot read) and its Rust I/O errors as OSError naming the file."""
    from safetensors.torch import save_file

    try:
        save_file(tensors, str(path), metadata={"format": "pt"})
    except Exception as error:  # safetensors raises SafetensorError for any I/O failure
        os_error = library_os_error(error, path)
        if os_error is None:
            raise ExportError(f"{path}: cannot write ({_first_line(error)})") from None
        raise os_error from None
    os.chmod(path, default_file_mode())


def load_full_model(export_dir: str | os.PathLike):
    """The full 3ML pre-training model (decoder included) of an export made with ``--with-decoder``, at TP = 1
    (initialises a single-process model-parallel state if none exists)."""
    from megatron.core import parallel_state
    from safetensors.torch import load_file

    from model import ModelConfig, build_model
    from model.parallel import initialize_single_process

    full_dir = Path(export_dir) / FULL_MODEL_SUBDIR
    config_path = full_dir / "config.json"
    if not config_path.is_file():
        raise ExportError(f"{config_path}: missing (export with --with-decoder)")
    config = ModelConfig.from_dict(json.loads(config_path.read_text()))
    if not parallel_state.model_parallel_is_initialized():
        initialize_single_process()
    if parallel_state.get_tensor_model_parallel_world_size() != 1:
        raise ExportError("load_full_model needs tensor-parallel size 1")
    model = build_model(config)
    missing, unexpected = model.load_state_dict(load_file(str(full_dir / "model.safetensors")), strict=False)
    missing = [name for name in missing if not name.endswith("_extra_state")]
    if missing or unexpected:
        raise ExportError(f"{full_dir}/model.safetensors: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model.eval()


# ---------------------------------------------------------------------------------------------------- CLI

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline export",
        description="Export a DeepSpeed pre-training checkpoint (any ZeRO stage, any TP size) to a Hugging Face "
                    "RoBERTa directory (encoder only), optionally with the full 3ML model.")
    parser.add_argument("checkpoint", help="run directory, its checkpoints/ directory, or one checkpoint tag dir")
    parser.add_argument("--output", required=True, help="Hugging Face directory to create")
    parser.add_argument("--tag", help="checkpoint tag (e.g. step_00001000) [default: the newest intact one]")
    parser.add_argument("--with-decoder", action="store_true",
                        help="also write the full pre-training model (decoder included) to OUTPUT/3ml/")
    parser.add_argument("--tokenizer", help="tokenizer.json to ship [default: the one recorded in the checkpoint]")
    parser.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    output = export_checkpoint(args.checkpoint, args.output, tag=args.tag, with_decoder=args.with_decoder,
                               tokenizer=args.tokenizer, overwrite=args.overwrite)
    info = json.loads((output / EXPORT_INFO_FILE).read_text())
    print(f"exported {info['source']} (step {info['step']}, ZeRO-{info['zero_stage']}, "
          f"TP={info['tensor_parallel_size']}) to {output} as {info['model_type']}"
          + (" with the MLM head" if info["mlm_head"] else "")
          + (f" and the full model in {output / FULL_MODEL_SUBDIR}" if info["with_decoder"] else ""))
    return 0


if __name__ == "__main__":
    exit_on_data_error(main)
