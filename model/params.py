"""Parameter counts of the presets, for comparison with the paper's Table 3.

``python -m pipeline params [--vocab-size 50265] [--presets base large]`` builds each model on the ``meta`` device
(no memory, no initialisation cost) with an unpadded vocabulary and prints total / encoder-kept-for-fine-tuning /
pre-training-only parameters, next to the paper's figures (in millions).
"""

from __future__ import annotations

import argparse
import sys
import warnings

import torch

from model.config import ARCHITECTURES, ModelConfig

# Table 3 (#Params, M): RoBERTa-base*, 3MLself-base, 3MLcross-base; 24hBERT-large*, 3MLself-large, 3MLcross-large.
PAPER_PARAMS_M = {("base", "mlm"): 125, ("base", "3ml-self"): 129, ("base", "3ml-cross"): 130,
                  ("large", "mlm"): 355, ("large", "3ml-self"): 362, ("large", "3ml-cross"): 364}


def count_parameters(config: ModelConfig) -> dict[str, int]:
    """{'total', 'encoder', 'pretraining_only'} for ``config`` at TP=1 (``encoder`` = what
    ``encoder_state_dict`` keeps). Sets up a single-process group if none exists."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from model.architectures import build_model
    from model.parallel import initialize_single_process

    if not dist.is_initialized() or not parallel_state.model_parallel_is_initialized():
        initialize_single_process()
    if parallel_state.get_tensor_model_parallel_world_size() != 1:
        raise RuntimeError("count_parameters: run with tensor parallel size 1")
    with torch.device("meta"):
        model = build_model(config)
    total = sum(p.numel() for p in model.parameters())
    encoder = sum(p.numel() for name, p in model.named_parameters() if model.is_encoder_parameter(name))
    return {"total": total, "encoder": encoder, "pretraining_only": total - encoder}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline params", description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocab-size", type=int, default=50265, help="|V| (RoBERTa BPE: 50,265)")
    parser.add_argument("--presets", nargs="+", default=["base", "large"], choices=ModelConfig.preset_names())
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
    print(f"{'preset':<6} {'architecture':<10} {'total':>14} {'encoder':>14} {'pretrain-only':>14}  paper (M)")
    for preset in args.presets:
        for arch in ARCHITECTURES:
            config = ModelConfig.preset(preset, arch, vocab_size=args.vocab_size, vocab_pad_multiple=1)
            counts = count_parameters(config)
            paper = PAPER_PARAMS_M.get((preset, arch), "-")
            print(f"{preset:<6} {arch:<10} {counts['total']:>14,} {counts['encoder']:>14,} "
                  f"{counts['pretraining_only']:>14,}  {paper}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
