"""Resume a run on a different number of data-parallel (DP) ranks through DeepSpeed's universal checkpoint.

A ZeRO checkpoint stores the optimizer state partitioned over the DP ranks that wrote it, so DeepSpeed can only
load it back with the same DP size. When a run loses (or gains) nodes, one command re-shards its newest
checkpoint for the new world size; training then resumes from it with the usual ``--load``:

    # the new world: N processes, launched like training (torchrun / srun / mpirun; one process: plain python)
    torchrun --nproc_per_node N -m pipeline.training.universal OLD_RUN_DIR --output NEW_RUN_DIR [--tag step_...]
    torchrun --nproc_per_node N run_pretrain.py SAME_ARGS... --load NEW_RUN_DIR --save NEW_RUN_DIR

``--output`` may be the old run directory itself: the checkpoint is then replaced in place (atomically, by
``pipeline.training.checkpoint.commit_checkpoint``). The slurm launcher does this automatically when the job has a
different number of tasks than the checkpoint's world (``slurm/launch.sh``, ``RESHARD_ON_WORLD_CHANGE``).

How (all DeepSpeed's own machinery):

1. rank 0 converts the checkpoint to the universal format with ``deepspeed.checkpoint.ds_to_universal``
   (per-parameter fp32 weights and Adam moments, merged over the DP partitions);
2. every rank builds the model and the DeepSpeed engine exactly as ``run_pretrain.py`` would for the new world
   (``ResolvedConfig.from_dict`` on the checkpoint's own configuration, ``pipeline.training.engine.build_engine``:
   the same builder, so the same parameter groups in the same order), loads the universal checkpoint
   with ``checkpoint.load_universal`` (which re-partitions the optimizer state for the new DP size) and the LR
   scheduler state;
3. it saves a native checkpoint for the new world with the same step and ``consumed_samples`` (the data
   sampler restarts at that global sample and shards the following global batches over the new DP ranks, so
   no sample is repeated or skipped), the configuration resolved for the new world, and RNG states (ranks that
   existed keep theirs; new ranks get the fresh streams a new run would seed).

The tensor-parallel size must stay the same (each TP rank's shard is converted and loaded on its own). ZeRO
stages 1, 2 and 3; a ZeRO-0 checkpoint (optimizer state not partitioned) needs no conversion: step 2 loads it
natively and step 3 re-saves it for the new world.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Sequence

from pipeline.errors import PipelineError


class UniversalError(PipelineError):
    """A checkpoint that cannot be re-sharded; ``str()`` is one line."""


def convert_to_universal(tag_dir: Path, output_dir: Path, tp_rank: int = 0) -> Path:
    """``ds_to_universal`` of tensor-parallel rank ``tp_rank``'s files of one checkpoint tag directory into
    ``output_dir`` (replaced if present).

    Each TP rank is converted on its own, as a TP=1 checkpoint: the universal loader takes a stored parameter
    whose shape equals the local one as is, so with an unchanged TP size every rank loads its own shard and no
    TP merge patterns (which megatron-deepspeed records and our engine does not) are needed."""
    import torch
    from deepspeed.checkpoint.constants import CHECKPOINT_PARALLEL_DIMS, CHECKPOINT_TP_DEGREE
    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    shutil.rmtree(output_dir, ignore_errors=True)
    output_dir.mkdir(parents=True)
    view = output_dir.parent / f"{output_dir.name}.source-view"
    shutil.rmtree(view, ignore_errors=True)
    view.mkdir()
    rank_tag = f"mp_rank_{tp_rank:02d}"
    # ZeRO-1/2: mp_rank_XX_model_states.pt; ZeRO-3: zero_pp_rank_D_mp_rank_XX_model_states.pt per DP rank.
    model_files = sorted(tag_dir.glob(f"*{rank_tag}_model_states.pt"))
    optim_files = sorted(tag_dir.glob(f"*_{rank_tag}_optim_states.pt"))
    if not model_files or not optim_files:
        raise UniversalError(f"{tag_dir}: no *{rank_tag}_model_states.pt / *_{rank_tag}_optim_states.pt for "
                             f"tensor-parallel rank {tp_rank} (a ZeRO-0 checkpoint?)")
    try:
        # The converter sees this rank's files under TP-rank-0 names. It saves every module entry as fp32;
        # megatron layers add `*._extra_state` entries that are None, so it reads copies without them, and the
        # universal checkpoint gets the original model states (the engine's strict module load wants them).
        for model_file in model_files:
            state = torch.load(model_file, map_location="cpu", weights_only=False)
            state["module"] = {k: v for k, v in state["module"].items() if isinstance(v, torch.Tensor)}
            if isinstance(state.get(CHECKPOINT_PARALLEL_DIMS), dict):  # the view holds one TP rank
                state[CHECKPOINT_PARALLEL_DIMS] = dict(state[CHECKPOINT_PARALLEL_DIMS], **{CHECKPOINT_TP_DEGREE: 1})
            torch.save(state, view / model_file.name.replace(rank_tag, "mp_rank_00"))
        for path in optim_files:
            os.symlink(path.resolve(), view / path.name.replace(rank_tag, "mp_rank_00"))
        args = SimpleNamespace(input_folder=str(view), output_folder=str(output_dir), num_extract_workers=1,
                               num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True)
        ds_to_universal(args)
        # DeepSpeed's loader wants the model states of every TP rank next to each other (it checks their count
        # against the saved TP size), and reads its own rank's.
        for path in output_dir.glob("*model_states.pt"):
            path.unlink()
        for path in sorted(tag_dir.glob("*model_states.pt")):
            shutil.copy2(path, output_dir / path.name)
    finally:
        shutil.rmtree(view, ignore_errors=True)
    return output_dir


def _rank_states_for_new_world(old_states: list, fresh_states: list) -> list:
    """Rank r of the new world keeps old rank r's RNG states if that rank existed (same TP rank: both worlds put
    consecutive ranks in one TP group); ranks beyond the old world get fresh streams."""
    return [old_states[r] if r < len(old_states) else fresh_states[r] for r in range(len(fresh_states))]


def reshard(source: str | os.PathLike, output: str | os.PathLike, tag: str | None = None,
            keep_universal: bool = False) -> Path:
    """Re-shards checkpoint ``source`` for the current world (see module docstring); returns the new tag dir.
    Call on every rank of the new world."""
    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator
    from megatron.core import parallel_state

    from model import build_model
    from model.parallel import initialize_model_parallel
    from pipeline.compat import disable_universal_checkpoint_loading
    from pipeline.io import canonical_json_sha256
    from pipeline.training.checkpoint import (CheckpointError, capture_rng_state, checkpoints_dir, commit_checkpoint,
                                              find_resume_point, partial_tag, read_run_config)
    from pipeline.training.config import ResolvedConfig
    from pipeline.training.distributed import control_group, init_distributed
    from pipeline.training.engine import build_engine
    from pipeline.training.metrics import log, setup_logging

    source, output = Path(source), Path(output)
    try:
        base = checkpoints_dir(source) if checkpoints_dir(source).is_dir() else source
        point = find_resume_point(base / tag if tag else source)
    except CheckpointError as error:
        raise UniversalError(str(error)) from None
    if point is None:
        raise UniversalError(f"{source}: no checkpoint to re-shard")
    saved = read_run_config(point.tag_dir)
    saved_config = saved["config"]
    zero_stage = int(saved_config["parallel"]["zero_stage"])

    launch = init_distributed()
    rank, world_size = dist.get_rank(), dist.get_world_size()
    setup_logging(rank)
    group = control_group()
    old_world = saved["world"]
    tp_size = int(old_world["tensor_parallel_size"])
    if world_size % tp_size:
        raise UniversalError(f"{point.tag_dir}: tensor-parallel size {tp_size} does not divide the new world "
                             f"size {world_size} (the TP size cannot change)")

    ckpt_dir = checkpoints_dir(output)
    universal_dir = ckpt_dir / f".universal-{point.tag}"
    if rank == 0:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
    dist.barrier(group=group)
    # One universal checkpoint per TP rank, converted by the first ranks of the new world in parallel.
    if zero_stage > 0 and rank < tp_size:
        convert_to_universal(point.tag_dir, universal_dir / f"tp_{rank:02d}" / point.tag, tp_rank=rank)
    dist.barrier(group=group)

    accelerator = get_accelerator()
    # The checkpoint's own configuration, laid out for the new world (no trip through the command line).
    config = ResolvedConfig.from_dict(saved_config, world_size, saved["dataset_meta"], accelerator.device_name(),
                                      accelerator.is_fp16_supported(), accelerator.is_bf16_supported(),
                                      save=str(output))
    config.launch = launch.to_dict()
    initialize_model_parallel(config.tensor_parallel_size, config.training.seed)

    # load_universal only for this engine: the saved configuration (and the resumed run) stay native.
    engine = build_engine(build_model(config.model), config.training, config.deepspeed,
                          load_universal=zero_stage > 0)
    load_dir = (universal_dir / f"tp_{parallel_state.get_tensor_model_parallel_rank():02d}" if zero_stage > 0
                else point.ckpt_dir)
    path, client_state = engine.load_checkpoint(str(load_dir), tag=point.tag, load_optimizer_states=True,
                                                load_lr_scheduler_states=True)
    if path is None or client_state is None:
        raise UniversalError(f"DeepSpeed could not load {load_dir / point.tag}")
    disable_universal_checkpoint_loading(engine)  # save natively

    fresh = [None] * world_size
    dist.all_gather_object(fresh, capture_rng_state(), group=group)
    rng_states = _rank_states_for_new_world(client_state["rng_states"], fresh)
    run_config = {key: saved[key] for key in saved}
    run_config.update({
        "config": config.to_dict(), "dataset_fingerprint": canonical_json_sha256(config.dataset_meta),
        "world": {"world_size": world_size, "tensor_parallel_size": config.tensor_parallel_size,
                  "data_parallel_size": config.data_parallel_size},
        "resharded_from": {"checkpoint": str(point.tag_dir), "world": old_world},
    })
    engine.save_checkpoint(str(ckpt_dir), tag=partial_tag(point.tag), client_state=dict(run_config,
                                                                                        rng_states=rng_states),
                           save_latest=False)
    dist.barrier(group=group)
    if rank == 0:
        commit_checkpoint(ckpt_dir, point.tag, int(saved["step"]), run_config)
        _carry_metrics(source, output, int(saved["step"]))
        if not keep_universal:
            shutil.rmtree(universal_dir, ignore_errors=True)
        log.info(f"re-sharded {point.tag_dir} (world {old_world['world_size']}, DP {old_world['data_parallel_size']}) "
              f"to {ckpt_dir / point.tag} (world {world_size}, DP {config.data_parallel_size}, TP "
              f"{config.tensor_parallel_size}); step {saved['step']}, {saved['consumed_samples']} samples consumed")
    dist.barrier(group=group)
    return ckpt_dir / point.tag


def _carry_metrics(source: Path, output: Path, step: int) -> None:
    """A new run directory continues the old one's metrics history (up to the checkpoint's step)."""
    from pipeline.io import write_text_atomic

    old, new = source / "metrics.jsonl", output / "metrics.jsonl"
    if source.resolve() == output.resolve() or not old.is_file():
        return
    kept = []
    for line in old.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            continue
    write_text_atomic(new, "".join(line + "\n" for line in kept))


def checkpoint_world_size(run_dir: str | os.PathLike) -> int | None:
    """World size of the newest intact checkpoint under ``run_dir`` (None if there is none)."""
    from pipeline.training.checkpoint import find_resume_point, read_run_config

    point = find_resume_point(run_dir, check_hashes=False)
    if point is None:
        return None
    return int(read_run_config(point.tag_dir)["world"]["world_size"])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline reshard",
        description="Re-shard a run's checkpoint for the current number of ranks (DeepSpeed universal "
                    "checkpoint); launch with the new world like training, then resume with --load OUTPUT.")
    parser.add_argument("source", help="run directory, its checkpoints/ directory or one checkpoint tag dir")
    parser.add_argument("--output", required=True, help="run directory to write (may be SOURCE: in place)")
    parser.add_argument("--tag", help="checkpoint tag in SOURCE [default: the newest intact one]")
    parser.add_argument("--keep-universal", action="store_true",
                        help="keep the intermediate universal checkpoint (OUTPUT/checkpoints/.universal-TAG)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m pipeline reshard``: errors reach ``pipeline.errors.run_cli`` (one line)."""
    args = build_parser().parse_args(argv)
    reshard(args.source, args.output, tag=args.tag, keep_universal=args.keep_universal)
    return 0


if __name__ == "__main__":
    from pipeline.errors import exit_on_data_error

    exit_on_data_error(main)
