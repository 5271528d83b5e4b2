"""python -m pipeline export: ZeRO-2 and ZeRO-3 checkpoints trained with TP=2 (2 CPU ranks) -> Hugging Face.

transformers loads the exported directory (AutoModel, AutoModelForMaskedLM, AutoTokenizer) and its hidden
states equal the pipeline's own encoder (built at TP=1 from the consolidated, TP-merged weights) on the same
input in fp32 (<= 1e-5); so do the MLM-head logits where the architecture has an encoder-width head.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from export_training import REPO, subprocess_env, tiny_train_args, torchrun  # noqa: E402
from test_faults import mounts  # noqa: E402,F401  (the tmpfs fixture)

TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tiny_dataset_prefix, tiny_tokenizer):
    """Short runs with 2 ranks at TP=2: 3MLself (post-LN) under ZeRO-2, 3MLcross (pre-LN) under ZeRO-3, RoBERTa
    MLM (post-LN, with its head) without ZeRO."""
    root = tmp_path_factory.mktemp("export_ckpt")
    runs = {}
    for name, architecture, ds_config in (("zero2", "3ml-self", "zero2_fp32.json"),
                                          ("zero3", "3ml-cross", "zero3_fp32.json"),
                                          ("zero0", "mlm", "zero0_fp32.json")):
        run_dir = root / name
        torchrun(2, tiny_train_args(tiny_dataset_prefix, tiny_tokenizer, run_dir, steps=3,
                                    architecture=architecture, ds_config=ds_config, tp=2), root / f"{name}.log")
        runs[name] = run_dir
    return runs


def _export(run_dir: Path, output: Path, *extra: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "pipeline", "export", str(run_dir), "--output", str(output), *extra],
                          env=subprocess_env(), capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def _own_model(state: dict, config):
    """The pipeline's model at TP=1 holding the exported checkpoint's weights."""
    from model import build_model
    from model.parallel import initialize_single_process

    initialize_single_process()
    model = build_model(config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all(name.endswith("_extra_state") for name in missing), (missing, unexpected)
    return model.eval()


def _inputs(export_dir: Path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(export_dir))
    batch = tokenizer(["The Prime Minister said the fires were under control.",
                       "Rain is forecast."], padding=True, return_tensors="pt")
    assert batch["attention_mask"][1].sum() < batch["attention_mask"][0].sum()  # the second row is padded
    return batch["input_ids"], batch["attention_mask"].bool()


def _check_export(run_dir: Path, export_dir: Path, expect_type: str, expect_head: bool):
    from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM

    from model import ModelConfig
    from pipeline.training.checkpoint import find_resume_point, read_run_config
    from pipeline.evaluation.export import load_merged_state_dict

    point = find_resume_point(run_dir)
    run_config = read_run_config(point.tag_dir)
    config = ModelConfig.from_dict(run_config["config"]["model"])
    state = load_merged_state_dict(point.tag_dir, run_config)
    own = _own_model(state, config)

    hf_config = AutoConfig.from_pretrained(str(export_dir))
    assert hf_config.model_type == expect_type
    info = json.loads((export_dir / "export_info.json").read_text())
    assert info["tensor_parallel_size"] == 2 and info["step"] == 3

    input_ids, mask = _inputs(export_dir)
    with torch.no_grad():
        ours = own.encoder(input_ids, mask)
        hf = AutoModel.from_pretrained(str(export_dir)).eval()
        theirs = hf(input_ids=input_ids, attention_mask=mask.long()).last_hidden_state
    # Padding rows are never used (and HF numbers their positions differently); compare real tokens.
    diff = (ours - theirs)[mask].abs().max().item()
    assert diff <= TOLERANCE, f"hidden states differ by {diff}"

    if expect_head:
        with torch.no_grad():
            hidden = own.encoder(input_ids, mask)
            vocab = config.vocab_size
            our_logits = torch.nn.functional.linear(own.head_transform(hidden),
                                                    own.encoder.embeddings.word_embeddings.weight[:vocab],
                                                    own.output_layer.bias[:vocab])
            mlm = AutoModelForMaskedLM.from_pretrained(str(export_dir)).eval()
            their_logits = mlm(input_ids=input_ids, attention_mask=mask.long()).logits
        diff = (our_logits - their_logits)[mask].abs().max().item()
        assert diff <= TOLERANCE, f"MLM logits differ by {diff}"
    return state, config


def test_export_zero2_tp2_post_ln_encoder(checkpoints, tmp_path):
    export_dir = tmp_path / "hf"
    out = _export(checkpoints["zero2"], export_dir)
    assert "ZeRO-2, TP=2" in out and "as roberta" in out
    state, _ = _check_export(checkpoints["zero2"], export_dir, "roberta", expect_head=False)
    # The decoder is dropped from the HF weights.
    from safetensors.torch import load_file
    assert not any("decoder" in name for name in load_file(str(export_dir / "model.safetensors")))
    # fp32 ZeRO-2: DeepSpeed's consolidated fp32 master weights are the module weights of the TP shards.
    from model import split_for_tensor_parallel
    from pipeline.training.checkpoint import find_resume_point, load_module_state_dicts
    module_shards = load_module_state_dicts(find_resume_point(checkpoints["zero2"]).tag_dir)
    for rank, shard in enumerate(module_shards):
        for name, tensor in shard.items():
            if isinstance(tensor, torch.Tensor):
                assert torch.equal(split_for_tensor_parallel(name, state[name], rank, 2), tensor), name


def test_export_zero3_tp2_pre_ln_with_mlm_head_and_decoder(checkpoints, tmp_path):
    export_dir = tmp_path / "hf"
    out = _export(checkpoints["zero3"], export_dir, "--with-decoder")
    assert "ZeRO-3, TP=2" in out and "roberta-prelayernorm with the MLM head" in out
    state, config = _check_export(checkpoints["zero3"], export_dir, "roberta-prelayernorm", expect_head=True)
    # The full model (decoder included) reloads with the same weights.
    from pipeline.evaluation.export import load_full_model
    full = load_full_model(export_dir)
    full_state = full.state_dict()
    assert any(name.startswith("decoder.") for name in state)
    for name, tensor in state.items():
        assert torch.equal(full_state[name], tensor), name


def test_export_zero0_tp2_mlm_with_head(checkpoints, tmp_path):
    export_dir = tmp_path / "hf"
    out = _export(checkpoints["zero0"], export_dir)
    assert "ZeRO-0, TP=2" in out and "as roberta with the MLM head" in out
    _check_export(checkpoints["zero0"], export_dir, "roberta", expect_head=True)


def test_export_refuses_bad_input(checkpoints, tmp_path):
    missing = tmp_path / "nowhere"
    proc = subprocess.run([sys.executable, "-m", "pipeline", "export", str(missing), "--output", str(tmp_path / "o")],
                          env=subprocess_env(), capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 1 and str(missing) in proc.stderr and "Traceback" not in proc.stderr
    existing = tmp_path / "exists"
    existing.mkdir()
    proc = subprocess.run([sys.executable, "-m", "pipeline", "export", str(checkpoints["zero2"]), "--output",
                           str(existing)], env=subprocess_env(), capture_output=True, text=True, timeout=120,
                          cwd=REPO)
    assert proc.returncode == 1 and "already exists" in proc.stderr
    assert not list(tmp_path.glob(".*partial*"))  # nothing half-written left behind


@pytest.mark.parametrize("architecture,pre_ln,tied,pad_id", [("mlm", False, False, 1), ("3ml-cross", True, True, 0)])
def test_hf_mapping_in_process(architecture, pre_ln, tied, pad_id):
    """encoder_to_hf on a freshly built model (no DeepSpeed): RoBERTa with the MLM head, untied output
    projection, and a padding id other than RoBERTa's 1 (HF position ids start at pad_id + 1)."""
    from transformers import AutoModelForMaskedLM

    from model import ModelConfig
    from pipeline.evaluation.export import encoder_to_hf, hf_config

    config = ModelConfig.preset("tiny", architecture, vocab_size=300, pre_ln=pre_ln, tie_embeddings=tied,
                                pad_token_id=pad_id, hidden_dropout=0.0, attention_dropout=0.0)
    from model import build_model
    from model.parallel import initialize_single_process

    initialize_single_process()
    own = build_model(config, init_seed=7).eval()
    with torch.no_grad():  # non-trivial LayerNorms and biases, so a wrong mapping cannot hide behind init values
        for name, param in own.named_parameters():
            if name.endswith("bias") or "layernorm" in name:
                param.add_(torch.randn_like(param) * 0.1)
    hf = AutoModelForMaskedLM.from_config(hf_config(config))
    missing, unexpected = hf.load_state_dict(encoder_to_hf(own.state_dict(), config), strict=False)
    assert not unexpected and not [m for m in missing if "decoder.weight" not in m or not tied], missing
    if tied:
        hf.tie_weights()
    hf.eval()
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(5, config.vocab_size, (2, 12), generator=generator)
    mask = torch.ones_like(input_ids, dtype=torch.bool)
    input_ids[1, 9:] = pad_id
    mask[1, 9:] = False
    with torch.no_grad():
        hidden = own.encoder(input_ids, mask)
        weight = own.encoder.embeddings.word_embeddings.weight if tied else own.output_layer.weight
        ours = torch.nn.functional.linear(own.head_transform(hidden), weight[:config.vocab_size],
                                          own.output_layer.bias[:config.vocab_size])
        their_hidden = hf.base_model(input_ids=input_ids, attention_mask=mask.long()).last_hidden_state
        their_logits = hf(input_ids=input_ids, attention_mask=mask.long()).logits
    assert (their_hidden - hidden)[mask].abs().max().item() <= TOLERANCE
    assert (their_logits - ours)[mask].abs().max().item() <= TOLERANCE


# ------------------------------------------------------------------------- faults (issue 14: items 1, 6, 7, 12)

@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory, tiny_dataset_prefix, tiny_tokenizer) -> Path:
    """One rank, TP=1, ZeRO-0, RoBERTa MLM: checkpoints at steps 2 and 4 (about 40 s)."""
    run_dir = tmp_path_factory.mktemp("two_checkpoints") / "run"
    torchrun(1, tiny_train_args(tiny_dataset_prefix, tiny_tokenizer, run_dir, steps=4, architecture="mlm",
                                ds_config="zero0_fp32.json", tp=1, extra=["--save-interval", "2"]),
             run_dir.parent / "train.log")
    return run_dir


def _export_module(*args: str) -> subprocess.CompletedProcess:
    """``python -m pipeline.evaluation.export ARGS`` (the module's own entry point, not the front door)."""
    return subprocess.run([sys.executable, "-m", "pipeline.evaluation.export", *args], env=subprocess_env(),
                          capture_output=True, text=True, timeout=300, cwd=REPO)


def _hidden_entries(directory: Path) -> list[str]:
    return sorted(path.name for path in directory.iterdir() if path.name.startswith("."))


def test_export_names_the_damaged_checkpoint_it_skips(two_checkpoints, tmp_path):
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(two_checkpoints, run_dir)
    newest = run_dir / "checkpoints" / "step_00000004" / "mp_rank_00_model_states.pt"
    os.truncate(newest, newest.stat().st_size - 1000)
    result = _export_module(str(run_dir), "--output", str(tmp_path / "hf"))
    assert result.returncode == 0, result.stderr
    assert (f"warning: skipping a damaged checkpoint: {newest}: truncated or modified" in result.stderr
            and f"exporting {run_dir / 'checkpoints' / 'step_00000002'} instead" in result.stderr), result.stderr
    assert json.loads((tmp_path / "hf" / "export_info.json").read_text())["step"] == 2


def test_export_files_follow_the_umask_and_overwrite_replaces_a_file_cleanly(two_checkpoints, tmp_path):
    from pipeline.evaluation.export import export_checkpoint

    output = tmp_path / "hf"
    output.write_text("a file where the export goes")
    mask = os.umask(0o022)
    try:
        export_checkpoint(two_checkpoints, output, overwrite=True)
    finally:
        os.umask(mask)
    assert output.is_dir() and _hidden_entries(tmp_path) == []  # no .hf.old-PID, no staging directory
    assert output.stat().st_mode & 0o777 == 0o755
    assert {path.name: path.stat().st_mode & 0o777 for path in output.iterdir()} == {
        name: 0o644 for name in ("config.json", "export_info.json", "model.safetensors", "tokenizer.json",
                                 "tokenizer_config.json")}


def test_export_failure_keeps_the_previous_export(two_checkpoints, tmp_path, monkeypatch):
    import errno

    import pipeline.evaluation.export as export_module

    output = tmp_path / "hf"
    export_module.export_checkpoint(two_checkpoints, output, tag="step_00000002")
    before = {path.name: path.read_bytes() for path in output.iterdir()}

    def disk_full(tensors, path):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(export_module, "_save_safetensors", disk_full)
    with pytest.raises(OSError, match="No space left on device"):
        export_module.export_checkpoint(two_checkpoints, output, overwrite=True)
    assert {path.name: path.read_bytes() for path in output.iterdir()} == before
    assert _hidden_entries(tmp_path) == []


def test_export_disk_full_and_read_only_are_one_line(two_checkpoints, tmp_path, mounts):  # noqa: F811
    from test_faults import _remount_read_only

    disk = mounts(tmp_path / "disk", "256k")  # the weights alone are ~600 KB
    result = _export_module(str(two_checkpoints), "--output", str(disk / "hf"))
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {disk}/.hf.tmp-") and last.endswith(": no space left on device"), last
    assert list(disk.iterdir()) == []
    _remount_read_only(disk)
    result = _export_module(str(two_checkpoints), "--output", str(disk / "hf"))
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {disk}/.hf.tmp-") and last.endswith(": read-only file system"), last
