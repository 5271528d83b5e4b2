"""``--compile none|layers|model``: the option (a bare ``--compile`` and a saved ``compile: true/false`` are the
per-layer mode), its refusals, and ``model`` -- DeepSpeed's ``engine.compile()``, the whole forward compiled --
training like eager (1 rank, fp32, the hook-free ZeRO-0 path) with checkpoints interchangeable between modes."""

from __future__ import annotations

import json

import pytest
import torch

from pipeline.errors import ConfigError

META = {"tokenizer": {"vocab_size": 300, "sha256": "0" * 64},
        "special_tokens": {"bos": 0, "pad": 1, "eos": 2, "unk": 3, "mask": 4}}


def _resolve(*options: str, ds_config: str = "zero0_fp32.json", world_size: int = 1):
    from pipeline.training.config import build_parser, resolve_config

    args = build_parser().parse_args(["--data-prefix", "d", "--micro-batch-size", "2", "--global-batch-size", "2",
                                      "--deepspeed_config", ds_config, *options])
    return resolve_config(args, world_size, META, "cpu", False, True)


def test_compile_option_modes_and_saved_flags():
    from pipeline.training.checkpoint import resume_differences
    from pipeline.training.config import ResolvedConfig, RuntimeConfig

    assert _resolve().runtime.compile == "none"
    assert _resolve("--compile").runtime.compile == "layers"  # the flag of recipes and scripts before the modes
    assert _resolve("--compile", "model").runtime.compile == "model"
    with pytest.raises(SystemExit):  # argparse names the choices
        _resolve("--compile", "graph")
    with pytest.raises(ConfigError, match="--compile must be one of none, layers, model, got 'graph'"):
        RuntimeConfig(data_prefix="d", compile="graph")

    # A configuration saved when the option was a flag loads (re-shard) and resumes under any mode.
    current = _resolve("--compile", "model")
    for flag, mode in ((True, "layers"), (False, "none")):
        saved = json.loads(json.dumps(current.to_dict()))
        saved["runtime"]["compile"] = flag
        assert ResolvedConfig.from_dict(saved, 1, META, "cpu", False, True).runtime.compile == mode
        assert resume_differences(saved, current.to_dict()) == ([], [])


def test_compile_mode_refusals():
    from pipeline.training.config import DS_CONFIG_DIR, TrainingConfig, build_deepspeed_config, check_compile_mode

    # DeepCompile is engine.compile() itself (CUDA only: the CPU refusal comes first, so check it as "cuda").
    deepcompile = build_deepspeed_config(DS_CONFIG_DIR / "zero2_bf16_autocast_deepcompile.json", TrainingConfig(),
                                         1, "cuda", True, True)
    for mode in ("layers", "model"):
        with pytest.raises(ConfigError, match=f"--compile {mode} and DeepCompile .* both compile the model"):
            check_compile_mode(mode, deepcompile, "x.json")
    check_compile_mode("none", deepcompile, "x.json")
    # ZeRO-3 partitions the parameters between forwards; the whole-model graph traces them empty.
    with pytest.raises(ConfigError, match="zero3_fp32.json: --compile model .* ZeRO stage 3"):
        _resolve("--compile", "model", ds_config="zero3_fp32.json")
    assert _resolve("--compile", "layers", ds_config="zero3_fp32.json").runtime.compile == "layers"
    # At TP > 1 dynamo breaks the graph at megatron-core's collectives: per-layer compile is the mode there.
    with pytest.raises(ConfigError, match="--compile model at --tensor-parallel-size 2: .* use --compile layers"):
        _resolve("--compile", "model", "--tensor-parallel-size", "2", world_size=2)
    assert _resolve("--compile", "layers", "--tensor-parallel-size", "2", world_size=2).runtime.compile == "layers"


# ------------------------------------------------------------------------------------ the compiled engine

def _batches(count: int, size: int, vocab_size: int) -> list[dict]:
    from bench.host_overhead import SPECIAL, SyntheticDataset
    from pipeline.data.masking import Masker, MaskingCollator, MaskingConfig

    masking = MaskingConfig(rate=0.5, seed=3)
    data = SyntheticDataset(Masker(masking, SPECIAL, vocab_size), 32, vocab_size, count * size, seed=3)
    collate = MaskingCollator(masking, SPECIAL.pad)
    return [collate([data[i * size + j] for j in range(size)]) for i in range(count)]


def _train(engine, batches) -> list[float]:
    losses = []
    for batch in batches:
        output = engine(batch)
        engine.backward(output.loss)
        engine.step()
        losses.append(output.loss.item())
    return losses


def _eval_loss(engine, batch) -> float:
    engine.eval()
    with torch.no_grad():
        loss = engine(batch).loss.item()
    engine.train()
    return loss


def test_whole_model_compile_trains_like_eager_and_checkpoints_interchange(single_process_group, monkeypatch,
                                                                           tmp_path):
    from model import build_model
    from model.config import ModelConfig
    from pipeline.training.config import DS_CONFIG_DIR, TrainingConfig, build_deepspeed_config
    from pipeline.training.engine import build_engine

    monkeypatch.setenv("LOCAL_RANK", "0")
    # No dropout: inductor draws its dropout masks from its own generator, so only then are the modes comparable.
    config = ModelConfig.preset("tiny", "3ml-self", vocab_size=300, hidden_dropout=0.0, attention_dropout=0.0)
    training = TrainingConfig(seq_len=32, global_batch_size=2, micro_batch_size=2, lr=1e-3, warmup_proportion=0.0)
    ds = build_deepspeed_config(DS_CONFIG_DIR / "zero0_fp32.json", training, 1, "cpu", False, True)

    def engine(mode: str):
        return build_engine(build_model(config, init_seed=1), training, ds, compile=mode)

    batches = _batches(6, 2, config.vocab_size)
    eval_batch = _batches(1, 3, config.vocab_size)[0]  # another batch size: compiles once more (static shapes)
    eager, compiled = engine("none"), engine("model")
    assert compiled.is_compiled and compiled.module._compiled_call_impl is not None and not eager.is_compiled

    eager_losses, compiled_losses = _train(eager, batches[:4]), _train(compiled, batches[:4])
    assert compiled_losses == pytest.approx(eager_losses, rel=1e-5)
    assert _eval_loss(compiled, eval_batch) == pytest.approx(_eval_loss(eager, eval_batch), rel=1e-5)

    # engine.compile() compiles the module in place: the parameter names stay the eager model's.
    names = list(eager.module.state_dict())
    assert list(compiled.module.state_dict()) == names and not any("_orig_mod" in n for n in names)
    compiled.save_checkpoint(str(tmp_path), tag="step4")
    saved = torch.load(tmp_path / "step4" / "mp_rank_00_model_states.pt", weights_only=False, map_location="cpu")
    assert list(saved["module"]) == names

    continued = _train(compiled, batches[4:])
    # Resumed under the same mode: exact. Under no compilation: the same losses within float tolerance.
    for mode, exact in (("model", True), ("none", False)):
        resumed = engine(mode)
        path, _ = resumed.load_checkpoint(str(tmp_path), tag="step4")
        assert path is not None
        losses = _train(resumed, batches[4:])
        assert losses == continued if exact else losses == pytest.approx(continued, rel=1e-5), (mode, losses)
