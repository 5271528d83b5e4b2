"""Checkpoint layout logic without DeepSpeed: atomic commit, manifest verification, fallback to the previous
complete checkpoint, pruning, and config comparison."""

from __future__ import annotations

import json

import pytest

from pipeline.training import checkpoint as ckpt


def fake_save(ckpt_dir, step, payload=b"weights"):
    """What engine.save_checkpoint + our commit produce for one step."""
    tag = ckpt.tag_for_step(step)
    partial = ckpt_dir / ckpt.partial_tag(tag)
    partial.mkdir(parents=True)
    (partial / "mp_rank_00_model_states.pt").write_bytes(payload * 100)
    (partial / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(payload * 300)
    ckpt.commit_checkpoint(ckpt_dir, tag, step, {"step": step, "config": {"model": {"hidden_size": 64}}})
    return ckpt_dir / tag


def test_commit_makes_a_verified_checkpoint_and_updates_latest(tmp_path):
    tag_dir = fake_save(tmp_path, 10)
    assert ckpt.read_latest(tmp_path) == "step_00000010"
    assert ckpt.verify_checkpoint(tag_dir) is None
    manifest = json.loads((tag_dir / "manifest.json").read_text())
    assert set(manifest["files"]) == {"mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
                                      "run_config.json"}
    assert ckpt.read_run_config(tag_dir)["step"] == 10
    point = ckpt.find_resume_point(tmp_path)
    assert point.tag == "step_00000010" and point.skipped == ()


def test_run_dir_and_explicit_tag_are_accepted(tmp_path):
    run_dir = tmp_path / "run"
    tag_dir = fake_save(ckpt.checkpoints_dir(run_dir), 4)
    assert ckpt.find_resume_point(run_dir).tag_dir == tag_dir
    assert ckpt.find_resume_point(tag_dir).tag_dir == tag_dir
    assert ckpt.find_resume_point(tmp_path / "missing") is None  # a fresh --load directory starts from scratch


def test_interrupted_save_is_invisible(tmp_path):
    fake_save(tmp_path, 10)
    partial = tmp_path / ckpt.partial_tag("step_00000020")
    partial.mkdir()
    (partial / "mp_rank_00_model_states.pt").write_bytes(b"half")
    assert ckpt.read_latest(tmp_path) == "step_00000010"
    assert ckpt.complete_tags(tmp_path) == ["step_00000010"]
    assert ckpt.find_resume_point(tmp_path).tag == "step_00000010"


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete", "no_manifest"])
def test_damaged_latest_falls_back_to_previous_complete(tmp_path, damage):
    fake_save(tmp_path, 10)
    newest = fake_save(tmp_path, 20)
    victim = newest / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    if damage == "truncate":
        victim.write_bytes(victim.read_bytes()[:5])
    elif damage == "flip":
        data = bytearray(victim.read_bytes())
        data[3] ^= 0xFF
        victim.write_bytes(bytes(data))
    elif damage == "delete":
        victim.unlink()
    else:
        (newest / "manifest.json").unlink()
    point = ckpt.find_resume_point(tmp_path)
    assert point.tag == "step_00000010"
    expected = {"truncate": "truncated", "flip": "corrupt", "delete": "missing", "no_manifest": "incomplete"}[damage]
    assert len(point.skipped) == 1 and expected in point.skipped[0] and "step_00000020" in point.skipped[0]


def test_no_intact_checkpoint_is_an_error(tmp_path):
    only = fake_save(tmp_path, 10)
    (only / "mp_rank_00_model_states.pt").write_bytes(b"x")
    with pytest.raises(ckpt.CheckpointError, match="no intact checkpoint"):
        ckpt.find_resume_point(tmp_path)
    with pytest.raises(ckpt.CheckpointError, match="truncated"):
        ckpt.find_resume_point(only)


def test_prune_keeps_last_k_and_removes_partials(tmp_path):
    for step in (1, 2, 3, 4):
        fake_save(tmp_path, step)
    (tmp_path / ckpt.partial_tag("step_00000005")).mkdir()
    removed = ckpt.prune_checkpoints(tmp_path, keep_last=2)
    assert sorted(removed) == [".partial-step_00000005", "step_00000001", "step_00000002"]
    assert ckpt.complete_tags(tmp_path) == ["step_00000004", "step_00000003"]
    assert ckpt.prune_checkpoints(tmp_path, keep_last=0) == []


def test_resaving_a_step_replaces_it(tmp_path):
    fake_save(tmp_path, 5, b"old")
    tag_dir = fake_save(tmp_path, 5, b"new")
    assert (tag_dir / "mp_rank_00_model_states.pt").read_bytes().startswith(b"new")
    assert ckpt.verify_checkpoint(tag_dir) is None and not list(tmp_path.glob(".partial-*"))


def test_config_differences_names_each_changed_key():
    saved = {"model": {"hidden_size": 64, "pre_ln": False}, "runtime": {"save": "a"}, "training": {"lr": 1e-3}}
    now = {"model": {"hidden_size": 128, "pre_ln": False}, "runtime": {"save": "b"}, "training": {"lr": 1e-3},
           "masking": {"rate": 0.4}}
    diffs = ckpt.config_differences(saved, now, ignore_prefixes=["runtime"])
    assert diffs == ["masking.rate: checkpoint '<absent>', now 0.4", "model.hidden_size: checkpoint 64, now 128"]


def _torch_checkpoint(ckpt_dir, step, sha256_all=False):
    """A checkpoint of real torch.save files, big enough (> SMALL_FILE_BYTES) that the default manifest skips
    their sha256 and relies on torch's per-record CRC-32."""
    import torch

    tag = ckpt.tag_for_step(step)
    partial = ckpt_dir / ckpt.partial_tag(tag)
    partial.mkdir(parents=True)
    generator = torch.Generator().manual_seed(step)
    torch.save({"module": {"w": torch.randn(400_000, generator=generator)}}, partial / "mp_rank_00_model_states.pt")
    ckpt.commit_checkpoint(ckpt_dir, tag, step, {"step": step}, sha256_all=sha256_all)
    return ckpt_dir / tag


def test_default_manifest_records_sizes_and_torch_crcs_and_still_catches_a_flipped_byte(tmp_path):
    _torch_checkpoint(tmp_path, 10)
    newest = _torch_checkpoint(tmp_path, 20)
    manifest = json.loads((newest / "manifest.json").read_text())["files"]
    weights = manifest["mp_rank_00_model_states.pt"]
    assert weights["bytes"] > ckpt.SMALL_FILE_BYTES and weights.get("zip_crc32") is True and "sha256" not in weights
    assert "sha256" in manifest["run_config.json"]
    assert ckpt.verify_checkpoint(newest) is None
    victim = newest / "mp_rank_00_model_states.pt"
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit inside the tensor data: same size, torch.load would not notice
    victim.write_bytes(bytes(data))
    point = ckpt.find_resume_point(tmp_path)
    assert point.tag == "step_00000010"
    assert "step_00000020" in point.skipped[0] and "fails its CRC-32" in point.skipped[0]
    # sizes alone (the cheap check of tools that only need the newest tag) do not read the bytes
    assert ckpt.verify_checkpoint(newest, check_hashes=False) is None


def test_checkpoint_sha256_on_demand(tmp_path):
    tag_dir = _torch_checkpoint(tmp_path, 5, sha256_all=True)
    files = json.loads((tag_dir / "manifest.json").read_text())["files"]
    assert all(len(entry["sha256"]) == 64 for entry in files.values())
    victim = tag_dir / "mp_rank_00_model_states.pt"
    data = bytearray(victim.read_bytes())
    data[-100] ^= 0x01
    victim.write_bytes(bytes(data))
    assert "corrupt (sha256 differs" in ckpt.verify_checkpoint(tag_dir)


@pytest.mark.parametrize("garbage", [b"\xff\xfe\x00step", b"step_\xc3\x28", b"not-a-tag"])
def test_latest_with_non_utf8_or_garbage_falls_back(tmp_path, garbage):
    fake_save(tmp_path, 10)
    (tmp_path / "latest").write_bytes(garbage)
    point = ckpt.find_resume_point(tmp_path)
    assert point.tag == "step_00000010" and len(point.skipped) == 1 and "no such checkpoint" in point.skipped[0]


def _config(**changes):
    config = {"model": {"hidden_size": 64}, "masking": {"rate": 0.4},
              "training": {"lr": 1e-3, "micro_batch_size": 4, "train_steps": 8},
              "parallel": {"gradient_accumulation_steps": 1, "zero_stage": 2, "data_parallel_size": 2},
              "deepspeed": {"config_file": "a.json", "config": {
                  "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1,
                  "optimizer": {"params": {"lr": 1e-3, "torch_adam": True}},
                  "zero_optimization": {"stage": 2, "reduce_bucket_size": 5e7, "overlap_comm": False}}},
              "runtime": {"save_interval": 10}}
    for key, value in changes.items():
        node = config
        *path, leaf = key.split(".")
        for part in path:
            node = node[part]
        node[leaf] = value
    return config


def test_resume_allows_implementation_changes_with_a_notice_and_refuses_the_rest():
    saved = _config()
    moved = _config(**{"training.micro_batch_size": 2, "parallel.gradient_accumulation_steps": 2,
                       "deepspeed.config.train_micro_batch_size_per_gpu": 2,
                       "deepspeed.config.gradient_accumulation_steps": 2,
                       "deepspeed.config.zero_optimization.reduce_bucket_size": 2e8,
                       "deepspeed.config.zero_optimization.overlap_comm": True,
                       "deepspeed.config_file": "b.json", "runtime.save_interval": 5, "training.train_steps": 16})
    notices, refusals = ckpt.resume_differences(saved, moved)
    assert refusals == []
    assert [n.split(":")[0] for n in notices] == [
        "deepspeed.config.gradient_accumulation_steps", "deepspeed.config.train_micro_batch_size_per_gpu",
        "deepspeed.config.zero_optimization.overlap_comm", "deepspeed.config.zero_optimization.reduce_bucket_size",
        "parallel.gradient_accumulation_steps", "training.micro_batch_size"]
    changed = _config(**{"training.lr": 2e-3, "deepspeed.config.optimizer.params.lr": 2e-3, "masking.rate": 0.3,
                         "model.hidden_size": 128, "deepspeed.config.zero_optimization.stage": 3,
                         "parallel.zero_stage": 3, "parallel.data_parallel_size": 1,
                         "training.micro_batch_size": 2})
    notices, refusals = ckpt.resume_differences(saved, changed)
    assert [n.split(":")[0] for n in notices] == ["training.micro_batch_size"]
    assert [r.split(":")[0] for r in refusals] == [
        "deepspeed.config.optimizer.params.lr", "deepspeed.config.zero_optimization.stage", "masking.rate",
        "model.hidden_size", "parallel.data_parallel_size", "parallel.zero_stage", "training.lr"]
