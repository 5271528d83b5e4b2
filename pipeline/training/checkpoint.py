"""Checkpoint directory layout, atomic commits, integrity checks, resume selection and RNG capture.

Layout of a run (``--save RUN_DIR``)::

    RUN_DIR/
      config.json                 resolved configuration of the latest start (model, masking, training, ...)
      metrics.jsonl               one JSON object per logged step / evaluation
      tensorboard/                TensorBoard event files
      stopped_by_signal           present only when the last start stopped for SIGTERM/SIGUSR1 (JSON)
      checkpoints/
        latest                    the tag of the newest *complete* checkpoint (replaced atomically)
        step_00001000/            one DeepSpeed checkpoint (``engine.save_checkpoint(dir, tag)``):
          mp_rank_00_model_states.pt            module weights (ZeRO 0-2) + client state, per TP rank
          zero_pp_rank_0_mp_rank_00_model_states.pt   (ZeRO-3 instead: one per DP x TP rank)
          *_optim_states.pt                     optimizer partitions (ZeRO) or full optimizer (ZeRO-0)
          run_config.json         client state without tensors: step, consumed samples, config, fingerprints
          manifest.json           written last: every file's size (+ sha256, see below); its presence = complete
        .partial-step_00002000/   a save in progress (or interrupted); never referenced by ``latest``
        zero_to_fp32.py           DeepSpeed's consolidation script (copied by DeepSpeed on every save)

Commit protocol (rank 0, after a barrier that follows DeepSpeed's own writes on every rank): write
``run_config.json`` and ``manifest.json`` into ``.partial-TAG``, rename it to ``TAG``, then replace ``latest``
(write a temporary file + ``os.replace``). A crash at any point leaves ``latest`` on the previous complete tag.
Loading verifies the manifest and falls back to the next older complete tag, naming what was wrong with the
newer one. The layout assumes the checkpoint directory is a file system shared by all ranks.

Integrity, cheap at save and complete at load: a save records every file's size, and the sha256 of the small
files (JSON, DeepSpeed's script); the ``*.pt`` files are zip archives in which torch stores a CRC-32 of every
record, so the load-time check reads them once and compares those CRCs (``zipfile.testzip``). A truncated file
fails the size check, a changed byte the CRC or hash check. Hashing every byte at save (``--checkpoint-sha256``)
made all ranks wait while rank 0 read the whole checkpoint again (measured in docs/DESIGN.md).
"""

from __future__ import annotations

import errno
import json
import os
import random
import re
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch

from pipeline.errors import PipelineError
from pipeline.io import file_sha256, fsync_dir, write_json_atomic, write_text_atomic

CHECKPOINTS_SUBDIR = "checkpoints"
LATEST_FILE = "latest"
MANIFEST_FILE = "manifest.json"
RUN_CONFIG_FILE = "run_config.json"
PARTIAL_PREFIX = ".partial-"
FORMAT_VERSION = 1
# Files up to this size are always hashed at save (JSON, scripts); larger ones are checked through torch's
# per-record CRC-32 at load unless --checkpoint-sha256 hashes them too.
SMALL_FILE_BYTES = 1 << 20
TAG_PATTERN = re.compile(r"^step_(\d+)$")

# Keys of the DeepSpeed client state (top-level keys of every *_model_states.pt) written by pipeline.training.trainer.
CLIENT_STATE_KEYS = (
    "format_version",  # FORMAT_VERSION
    "step",  # optimizer steps done
    "consumed_samples",  # training samples consumed (global, all DP ranks): where the sampler restarts
    "data_epoch",  # epoch of the next training sample (consumed_samples // samples per epoch)
    "rng_states",  # list indexed by global rank: python/numpy/torch/accelerator/TP-tracker states
    "config",  # the full resolved config (pipeline.training.config.ResolvedConfig.to_dict())
    "tokenizer_fingerprint",  # sha256 of tokenizer.json
    "dataset_meta",  # the content of the dataset's meta.json
    "dataset_fingerprint",  # sha256 of the canonical JSON of dataset_meta
    "world",  # {"world_size", "tensor_parallel_size", "data_parallel_size"}
)


class CheckpointError(PipelineError):
    """A checkpoint that cannot be used (missing, corrupt, incompatible); ``str()`` is one line."""


def tag_for_step(step: int) -> str:
    return f"step_{int(step):08d}"


def step_of_tag(tag: str) -> int | None:
    match = TAG_PATTERN.match(tag)
    return int(match.group(1)) if match else None


def checkpoints_dir(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / CHECKPOINTS_SUBDIR


def partial_tag(tag: str) -> str:
    return PARTIAL_PREFIX + tag


def _torch_zip_with_crc(path: Path) -> bool:
    """True for a torch.save zip archive whose records carry CRC-32s (torch writes them unless turned off)."""
    return path.suffix == ".pt" and torch.serialization.get_crc32_options() and zipfile.is_zipfile(path)


def build_manifest(tag_dir: Path, step: int, sha256_all: bool = False) -> dict:
    """Every file's size; the sha256 of small files, of files that carry no CRC, or of all (``sha256_all``)."""
    # Hand-written: DeepSpeed's save writes no record of what a complete checkpoint holds, so a truncated or
    # half-copied tag would load (or crash) without one.
    files = {}
    for path in sorted(p for p in Path(tag_dir).rglob("*") if p.is_file() and p.name != MANIFEST_FILE):
        entry = {"bytes": path.stat().st_size}
        if sha256_all or entry["bytes"] <= SMALL_FILE_BYTES or not _torch_zip_with_crc(path):
            entry["sha256"] = file_sha256(path)
        else:
            entry["zip_crc32"] = True
        files[str(path.relative_to(tag_dir))] = entry
    if not files:
        raise CheckpointError(f"{tag_dir}: DeepSpeed wrote no files")
    return {"format_version": FORMAT_VERSION, "step": int(step), "files": files}


def commit_checkpoint(ckpt_dir: Path, tag: str, step: int, run_config: dict, sha256_all: bool = False) -> Path:
    """Rank 0, after every rank has written its part into ``.partial-TAG``: makes the checkpoint visible."""
    ckpt_dir = Path(ckpt_dir)
    partial = ckpt_dir / partial_tag(tag)
    final = ckpt_dir / tag
    write_json_atomic(partial / RUN_CONFIG_FILE, run_config)
    write_json_atomic(partial / MANIFEST_FILE, build_manifest(partial, step, sha256_all))
    fsync_dir(partial)
    if final.exists():  # the same step saved again (e.g. a signal right after a periodic save)
        stale = ckpt_dir / f"{PARTIAL_PREFIX}stale-{tag}"
        shutil.rmtree(stale, ignore_errors=True)
        os.replace(final, stale)
        shutil.rmtree(stale, ignore_errors=True)
    os.replace(partial, final)
    fsync_dir(ckpt_dir)
    write_text_atomic(ckpt_dir / LATEST_FILE, tag)
    return final


def verify_checkpoint(tag_dir: Path, check_hashes: bool = True) -> str | None:
    """None if ``tag_dir`` is a complete, intact checkpoint, else a one-line reason."""
    tag_dir = Path(tag_dir)
    manifest_path = tag_dir / MANIFEST_FILE
    if not tag_dir.is_dir():
        return f"{tag_dir}: no such checkpoint directory"
    if not manifest_path.is_file():
        return f"{tag_dir}: incomplete checkpoint (no {MANIFEST_FILE}; the save was interrupted)"
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        return f"{manifest_path}: unreadable manifest ({error})"
    for name, expected in files.items():
        path = tag_dir / name
        if not path.is_file():
            return f"{path}: missing (listed in {MANIFEST_FILE})"
        size = path.stat().st_size
        if size != expected["bytes"]:
            return f"{path}: truncated or modified ({size} bytes, manifest says {expected['bytes']})"
        if not check_hashes:
            continue
        if "sha256" in expected:
            if file_sha256(path) != expected["sha256"]:
                return f"{path}: corrupt (sha256 differs from {MANIFEST_FILE})"
        elif expected.get("zip_crc32"):
            reason = _zip_crc_problem(path)
            if reason:
                return f"{path}: corrupt ({reason})"
        else:
            return f"{path}: {MANIFEST_FILE} records no check for it"
    return None


def _zip_crc_problem(path: Path) -> str | None:
    """None if every record of the zip archive ``path`` matches its stored CRC-32, else what is wrong."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as error:
        return f"not a readable torch archive: {error}"
    return f"record {bad} fails its CRC-32" if bad else None


def complete_tags(ckpt_dir: Path) -> list[str]:
    """Tags that have a manifest, newest step first (without verifying file contents)."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    tags = [p.name for p in ckpt_dir.iterdir()
            if p.is_dir() and step_of_tag(p.name) is not None and (p / MANIFEST_FILE).is_file()]
    return sorted(tags, key=step_of_tag, reverse=True)


def read_latest(ckpt_dir: Path) -> str | None:
    path = Path(ckpt_dir) / LATEST_FILE
    try:
        raw = path.read_bytes()
    except OSError:
        return None
    # Non-ASCII bytes are shown escaped: such a tag names no checkpoint, and the caller falls back past it as
    # past any other unknown tag.
    tag = raw.decode("ascii", errors="backslashreplace").strip()
    return tag or None


@dataclass(frozen=True)
class ResumePoint:
    ckpt_dir: Path  # the directory DeepSpeed's load_checkpoint(load_dir=...) takes
    tag: str
    skipped: tuple[str, ...]  # reasons why newer checkpoints were not used

    @property
    def tag_dir(self) -> Path:
        return self.ckpt_dir / self.tag


def find_resume_point(load_path: str | os.PathLike, check_hashes: bool = True) -> ResumePoint | None:
    """The checkpoint ``--load PATH`` resumes from.

    ``PATH`` may be a run directory, its ``checkpoints/`` directory, or one tag directory. For a directory of
    checkpoints: the tag in ``latest`` if it verifies, else the newest older complete tag that verifies (the
    reasons for skipping are returned so the caller can report them). None if there is no checkpoint at all;
    CheckpointError if there are checkpoints but none is intact, or an explicit tag is damaged."""
    path = Path(load_path)
    if (path / MANIFEST_FILE).is_file() or step_of_tag(path.name) is not None:
        reason = verify_checkpoint(path, check_hashes)
        if reason:
            raise CheckpointError(reason)
        return ResumePoint(path.parent, path.name, ())
    ckpt_dir = path / CHECKPOINTS_SUBDIR if (path / CHECKPOINTS_SUBDIR).is_dir() else path
    latest = read_latest(ckpt_dir)
    candidates = complete_tags(ckpt_dir)
    if latest is not None:
        candidates = [latest] + [t for t in candidates if t != latest and
                                 (step_of_tag(latest) is None or step_of_tag(t) < step_of_tag(latest))]
    skipped: list[str] = []
    for tag in candidates:
        reason = verify_checkpoint(ckpt_dir / tag, check_hashes)
        if reason is None:
            return ResumePoint(ckpt_dir, tag, tuple(skipped))
        skipped.append(reason)
    if skipped:
        raise CheckpointError(f"no intact checkpoint in {ckpt_dir}: " + "; ".join(skipped))
    return None


def prune_checkpoints(ckpt_dir: Path, keep_last: int) -> list[str]:
    """Deletes complete checkpoints beyond the newest ``keep_last`` (never the one ``latest`` names) and
    leftovers of interrupted saves. Rank 0 only, between saves. Returns the removed names."""
    ckpt_dir = Path(ckpt_dir)
    removed = []
    latest = read_latest(ckpt_dir)
    if keep_last > 0:
        for tag in complete_tags(ckpt_dir)[keep_last:]:
            if tag != latest:
                shutil.rmtree(ckpt_dir / tag, ignore_errors=True)
                removed.append(tag)
    for path in ckpt_dir.glob(PARTIAL_PREFIX + "*"):
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path.name)
    return removed


def read_run_config(tag_dir: str | os.PathLike) -> dict:
    """The JSON client state of a checkpoint (config, step, fingerprints) without loading any tensor."""
    path = Path(tag_dir) / RUN_CONFIG_FILE
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{path}: cannot read ({error})") from None


def model_state_files(tag_dir: str | os.PathLike) -> list[Path]:
    """The ``*_model_states.pt`` files of a checkpoint, one per TP rank for ZeRO 0-2 (``mp_rank_XX``)."""
    return sorted(Path(tag_dir).glob("*model_states.pt"))


def load_module_state_dicts(tag_dir: str | os.PathLike) -> list[dict[str, torch.Tensor]]:
    """Module weights per tensor-parallel rank (index = TP rank) of a ZeRO 0-2 checkpoint.

    ZeRO-3 partitions the weights across DP ranks; those checkpoints are consolidated with DeepSpeed's
    ``zero_to_fp32`` (see ``deepspeed.utils.zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint``)."""
    files = sorted(Path(tag_dir).glob("mp_rank_*_model_states.pt"))
    if not files:
        raise CheckpointError(f"{tag_dir}: no mp_rank_*_model_states.pt (a ZeRO-3 checkpoint? use zero_to_fp32)")
    return [torch.load(f, map_location="cpu", weights_only=False)["module"] for f in files]


# ----------------------------------------------------------------------------------------------- RNG states

def capture_rng_state() -> dict:
    """Every random stream a training step can draw from on this rank."""
    from deepspeed.accelerator import get_accelerator

    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "accelerator": None,
        "tensor_parallel_tracker": None,
    }
    accelerator = get_accelerator()
    if accelerator.device_name() != "cpu":
        state["accelerator"] = accelerator.get_rng_state()
    try:
        from model.parallel import get_rng_tracker_states
        state["tensor_parallel_tracker"] = get_rng_tracker_states()
    except ImportError:
        pass
    return state


def restore_rng_state(state: dict) -> None:
    from deepspeed.accelerator import get_accelerator

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("accelerator") is not None:
        get_accelerator().set_rng_state(state["accelerator"])
    if state.get("tensor_parallel_tracker") is not None:
        from model.parallel import set_rng_tracker_states
        set_rng_tracker_states(state["tensor_parallel_tracker"])


# ------------------------------------------------------------------------------------- config compatibility

def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, dict):
        out = {}
        for key, value in obj.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: obj}


def config_differences(saved: dict, current: dict, ignore_prefixes: Iterable[str] = ()) -> list[str]:
    """``key: checkpoint X, now Y`` for every leaf that differs, except keys under ``ignore_prefixes``."""
    ignore = tuple(ignore_prefixes)
    a, b = _flatten(saved), _flatten(current)
    diffs = []
    for key in sorted(set(a) | set(b)):
        if any(key == p or key.startswith(p + ".") for p in ignore):
            continue
        va, vb = a.get(key, "<absent>"), b.get(key, "<absent>")
        if isinstance(va, (list, tuple)) and isinstance(vb, (list, tuple)):
            va, vb = list(va), list(vb)
        if va != vb:
            diffs.append(f"{key}: checkpoint {va!r}, now {vb!r}")
    return diffs


# Keys of the resolved config that may change between a checkpoint and its resume without a word: where things
# go, how often we log/evaluate/save, and for how long we train (extending a run recomputes the LR horizon).
RESUMABLE_CHANGES = ("runtime", "launch", "data.prefix", "data.tokenizer", "training.train_steps",
                     "deepspeed.config_file")
# Implementation settings a user changes when moving a run to other GPUs: allowed with a notice. Each optimizer
# step still takes the same global batch of samples (the sampler cuts it by consumed samples); what changes is
# how it is split: the loss is a mean per micro batch (so tokens are weighted per micro batch), sums run in
# another order and dropout draws differ -- close to the original run, not bitwise.
IMPLEMENTATION_CHANGES = ("training.micro_batch_size", "parallel.gradient_accumulation_steps",
                          "deepspeed.config.train_micro_batch_size_per_gpu",
                          "deepspeed.config.gradient_accumulation_steps", "deepspeed.config.zero_optimization",
                          "deepspeed.config.optimizer.params.torch_adam", "deepspeed.config.steps_per_print",
                          "deepspeed.config.wall_clock_breakdown", "deepspeed.config.zero_allow_untested_optimizer",
                          "deepspeed.config.flops_profiler", "deepspeed.config.comms_logger",
                          "deepspeed.config.checkpoint")
# ... except these, which change what the optimizer state means or how it is partitioned.
NOT_IMPLEMENTATION = ("deepspeed.config.zero_optimization.stage",)


def _under(key: str, prefixes: Iterable[str]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def resume_differences(saved: dict, current: dict) -> tuple[list[str], list[str]]:
    """(notices, refusals) for resuming a checkpoint saved with config ``saved`` under config ``current``
    (both ``ResolvedConfig.to_dict()``): implementation settings that changed (allowed, said out loud) and
    every other difference that matters (model, data, masking, optimiser hyper-parameters, layout)."""
    notices, refusals = [], []
    for diff in config_differences(saved, current, RESUMABLE_CHANGES):
        key = diff.split(":", 1)[0]
        if _under(key, IMPLEMENTATION_CHANGES) and not _under(key, NOT_IMPLEMENTATION):
            notices.append(diff)
        else:
            refusals.append(diff)
    return notices, refusals


# --------------------------------------------------------------------------------------------- save / load

def _save_failure(error: BaseException, path: Path) -> str:
    """One line for a failed save. torch's zip writer reports a full disk as a RuntimeError without errno
    (``[enforce fail at inline_container.cc] ... unexpected pos``), so a nearly full file system is named as
    the cause when the error itself carries none."""
    from pipeline.errors import describe_os_error, one_line

    if isinstance(error, OSError):
        return describe_os_error(error)
    try:
        stats = os.statvfs(path if path.exists() else path.parent)
        nearly_full = stats.f_bavail * stats.f_frsize < 64 << 20
    except OSError:
        nearly_full = False
    if nearly_full:
        return f"{path}: {os.strerror(errno.ENOSPC).lower()}"
    return f"{path}: {one_line(error)}"


def save_checkpoint(engine, ckpt_dir: Path, step: int, client_state: dict, run_config: dict, keep_last: int,
                    control_group, is_rank0: bool, sha256_all: bool = False, pause=None) -> tuple[str, list[str]]:
    """Every rank: DeepSpeed writes into ``.partial-TAG``; after all ranks succeeded, rank 0 commits it (the
    protocol in the module docstring) and prunes old checkpoints. A failed write on any rank (e.g. a full disk)
    is agreed by all ranks, rank 0 removes the partial directory, and every rank raises the same one-line
    ``CheckpointError``. Returns (tag, removed names). ``pause``: the tests' hook, called between the writes and
    the commit."""
    import torch.distributed as dist

    tag = tag_for_step(step)
    partial = Path(ckpt_dir) / partial_tag(tag)
    if is_rank0:
        Path(ckpt_dir).mkdir(parents=True, exist_ok=True)
    dist.barrier()
    failure = None
    try:
        engine.save_checkpoint(str(ckpt_dir), tag=partial_tag(tag), client_state=client_state, save_latest=False)
    except (OSError, RuntimeError) as error:
        failure = _save_failure(error, partial)
        # DeepSpeed's save ends with a barrier on the default group that the ranks whose writes succeeded are
        # waiting in: join it, then agree on the outcome below.
        dist.barrier()
    if pause is not None:
        pause()
    flag = torch.tensor([0 if failure is None else 1], dtype=torch.int32)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=control_group)
    if int(flag.item()):
        reasons: list = [None] * dist.get_world_size(control_group)
        dist.all_gather_object(reasons, failure, group=control_group)
        if is_rank0:
            shutil.rmtree(partial, ignore_errors=True)
        dist.barrier(group=control_group)
        reason = next(r for r in reasons if r is not None)
        raise CheckpointError(f"{reason} (checkpoint of step {step} not saved; its partial directory was removed)")
    removed: list[str] = []
    if is_rank0:
        try:
            commit_checkpoint(ckpt_dir, tag, step, run_config, sha256_all)
        except OSError as error:
            failure = _save_failure(error, partial)
            shutil.rmtree(partial, ignore_errors=True)
        else:
            removed = prune_checkpoints(ckpt_dir, keep_last)
    outcome = [failure]
    dist.broadcast_object_list(outcome, src=0, group=control_group)
    if outcome[0] is not None:
        raise CheckpointError(f"{outcome[0]} (checkpoint of step {step} not saved; its partial directory was "
                              "removed)")
    return tag, removed


def load_checkpoint(engine, point: ResumePoint) -> dict:
    """Loads ``point`` into ``engine`` (module, optimizer and LR scheduler states) and returns the client state.
    Undoes what DeepSpeed's ZeRO-3 universal loader changes in the optimizer (``pipeline.compat``)."""
    from pipeline.compat import optimizer_weight_decays, undo_zero3_universal_loader_changes

    optimizer = getattr(engine.optimizer, "optimizer", engine.optimizer)
    weight_decays = optimizer_weight_decays(optimizer)
    path, client_state = engine.load_checkpoint(str(point.ckpt_dir), tag=point.tag, load_optimizer_states=True,
                                                load_lr_scheduler_states=True)
    if path is None or client_state is None:
        raise CheckpointError(f"DeepSpeed could not load {point.tag_dir}")
    undo_zero3_universal_loader_changes(optimizer, weight_decays)
    return client_state
