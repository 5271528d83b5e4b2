"""Training FLOPs of MLM (RoBERTa), 3MLself and 3MLcross: the paper's Appendix D formulas.

Conventions (Appendix D, after Pan et al. 2021 and Clark et al. 2020): only matrix multiplications count; a
fused multiply-add is 2 FLOPs; embeddings are sparse look-ups (0 FLOPs); bias, activation, LayerNorm, softmax
and dropout are neglected (< 1%); backward costs the same as forward, so a training step is 2x forward
(``fwd_bwd_factor=2``; the Megatron/Chinchilla convention counts backward as 2x forward, i.e. 3x in total --
pass ``fwd_bwd_factor=3`` for MFU figures comparable to theirs; speedups do not depend on it).

One difference from the paper's text: the paper writes the MLP as d -> 4d -> d (16 n d^2); we use the config's
actual FFN width f (4 n d f), which is the same for every preset in Table 4 (f = 4d) and exact otherwise.

Per sequence of length n, masking rate r, a fraction m (= 0.8) of the corrupted tokens replaced by <mask>::

    block(n, d, f)           = 8 n d^2 + 4 n^2 d + 4 n d f              self-attention + MLP
    cross_block(ne, nd, d, f) = block(nd, d, f) + 4 ne d^2 + 4 nd d^2 + 4 ne nd d
    pred(n, r, d_in, d_en)   = 2 n r (d_in d_en + d_en |V|)            head transform + tied vocab projection

    MLM (eq. 2)      l block(n, d, f) + pred(n, r, d, d)
    3MLself (eq. 3)  2 ne d_en d_de + l_en block(ne, d_en, f) + l_de block(n, d_de, f_de) + pred(n, r, d_de, d_en)
    3MLcross (eq. 4) 2 ne d_en d_de + l_en block(ne, d_en, f) + l_de cross_block(ne, nd, d_de, f_de)
                     + pred(ne, (1-m) r / (1 - m r), d_en, d_en) + pred(nd, 1, d_de, d_en)

with ne = (1 - m r) n (the encoder drops the <mask> tokens) and nd = m r n (3MLcross decoder queries). A step of
``batch`` sequences costs ``fwd_bwd_factor * batch * forward``. |V| is the tokenizer vocabulary
(``config.vocab_size``), not the TP-padded one.

CLI: ``python -m pipeline flops --preset large --arch 3ml-self --rate 0.5 --seq-len 128 --batch 4096
--baseline-arch mlm --baseline-rate 0.15 [--json]``.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass

from model.config import ARCHITECTURES, ModelConfig
from pipeline.errors import ConfigError
from pipeline.io import read_json_object

PAPER_FWD_BWD_FACTOR = 2.0
# Achieved TFLOP/s and MFU count backward as 2x forward (Megatron/PaLM convention), so they compare with
# other frameworks' MFU; the paper's factor 2 is kept for its FLOPs budgets and speedups.
MFU_FWD_BWD_FACTOR = 3.0
DEFAULT_MASK_FRACTION = 0.8


def block_flops(n: float, d: int, ffn: int) -> float:
    """Self-attention Transformer block: QKV 6nd^2, scores 2n^2d, weighted sum 2n^2d, output 2nd^2, MLP 4ndf."""
    return 8 * n * d * d + 4 * n * n * d + 4 * n * d * ffn


def cross_block_flops(n_enc: float, n_dec: float, d: int, ffn: int) -> float:
    """3MLcross decoder block: self-attention + MLP over the n_dec queries, plus cross-attention (Q and output
    projections on the queries, K and V on the n_enc memory, scores and weighted sum n_enc x n_dec)."""
    return block_flops(n_dec, d, ffn) + 4 * n_enc * d * d + 4 * n_dec * d * d + 4 * n_enc * n_dec * d


def prediction_flops(n: float, rate: float, d_in: int, d_enc: int, vocab: int) -> float:
    """Prediction layer on n*rate tokens: dense d_in -> d_enc, then the tied projection d_enc -> |V|."""
    return 2 * n * rate * (d_in * d_enc + d_enc * vocab)


def forward_flops_by_stage(config: ModelConfig, seq_len: int, masking_rate: float,
                           mask_fraction: float = DEFAULT_MASK_FRACTION) -> dict[str, float]:
    """Forward FLOPs for one sequence (see module docstring) by stage of the model: ``encoder`` (its layers),
    ``decoder`` (3ML's projection to the decoder width and its layers; 0 for MLM) and ``head`` (prediction
    layers: transform and vocabulary projection). ``bench.stages`` times the same stages."""
    if not (0.0 < masking_rate < 1.0):
        raise ValueError(f"masking_rate must be in (0, 1), got {masking_rate}")
    if not (0.0 <= mask_fraction <= 1.0):
        raise ValueError(f"mask_fraction must be in [0, 1], got {mask_fraction}")
    n, r, m, vocab = float(seq_len), masking_rate, mask_fraction, config.vocab_size
    d_en, d_de = config.hidden_size, config.decoder_hidden_size
    if config.architecture == "mlm":
        return {"encoder": config.num_layers * block_flops(n, d_en, config.ffn_size), "decoder": 0.0,
                "head": prediction_flops(n, r, d_en, d_en, vocab)}
    n_enc = (1.0 - m * r) * n
    encoder = config.num_layers * block_flops(n_enc, d_en, config.ffn_size)
    projection = 2 * n_enc * d_en * d_de
    if config.architecture == "3ml-self":
        decoder = config.decoder_num_layers * block_flops(n, d_de, config.decoder_ffn_size)
        return {"encoder": encoder, "decoder": projection + decoder,
                "head": prediction_flops(n, r, d_de, d_en, vocab)}
    n_dec = m * r * n
    decoder = config.decoder_num_layers * cross_block_flops(n_enc, n_dec, d_de, config.decoder_ffn_size)
    kept_rate = (1.0 - m) * r / (1.0 - m * r)  # replaced + unchanged, as a fraction of the encoder length
    return {"encoder": encoder, "decoder": projection + decoder,
            "head": (prediction_flops(n_enc, kept_rate, d_en, d_en, vocab)
                     + prediction_flops(n_dec, 1.0, d_de, d_en, vocab))}


def forward_flops(config: ModelConfig, seq_len: int, masking_rate: float,
                  mask_fraction: float = DEFAULT_MASK_FRACTION) -> float:
    """Forward FLOPs for one sequence (see module docstring): the sum over ``forward_flops_by_stage``."""
    return sum(forward_flops_by_stage(config, seq_len, masking_rate, mask_fraction).values())


def training_flops(config: ModelConfig, batch: int, seq_len: int, masking_rate: float, *,
                   mask_fraction: float = DEFAULT_MASK_FRACTION,
                   fwd_bwd_factor: float = PAPER_FWD_BWD_FACTOR) -> float:
    """FLOPs of one optimizer step over ``batch`` sequences (the global batch) of ``seq_len`` tokens."""
    return fwd_bwd_factor * batch * forward_flops(config, seq_len, masking_rate, mask_fraction)


def speedup(candidate: ModelConfig, candidate_rate: float, baseline: ModelConfig, baseline_rate: float,
            seq_len: int, mask_fraction: float = DEFAULT_MASK_FRACTION) -> float:
    """How many times fewer FLOPs per sequence ``candidate`` needs than ``baseline``."""
    return (forward_flops(baseline, seq_len, baseline_rate, mask_fraction)
            / forward_flops(candidate, seq_len, candidate_rate, mask_fraction))


@dataclass
class FlopsReport:
    architecture: str
    masking_rate: float
    seq_len: int
    batch: int
    flops_per_step: float
    flops_per_sequence: float


def _config_from_args(preset: str | None, config_json: str | None, architecture: str, vocab_size: int | None):
    if config_json:
        values = read_json_object(config_json, "model configuration JSON")
        values = values.get("model", values)  # a checkpoint's config file may nest the model section
        if not isinstance(values, dict):
            raise ConfigError(f"{config_json}: its \"model\" section is not a JSON object")
        values["architecture"] = architecture or values["architecture"]
        config = ModelConfig.from_dict(values)
    else:
        config = ModelConfig.preset(preset, architecture)
    if vocab_size:
        config = ModelConfig.from_dict({**config.to_dict(), "vocab_size": vocab_size})
    return config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline flops", description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="base", choices=ModelConfig.preset_names())
    parser.add_argument("--config", help="a ModelConfig JSON (e.g. saved with a checkpoint) instead of --preset")
    parser.add_argument("--arch", default="3ml-self", choices=ARCHITECTURES)
    parser.add_argument("--rate", type=float, default=0.5, help="masking rate of --arch")
    parser.add_argument("--seq-len", type=int, default=None, help="default: 128 for large, 512 otherwise")
    parser.add_argument("--batch", type=int, default=1, help="sequences per optimizer step (global batch)")
    parser.add_argument("--vocab-size", type=int, default=None)
    parser.add_argument("--mask-fraction", type=float, default=DEFAULT_MASK_FRACTION,
                        help="fraction of corrupted tokens replaced by <mask> (0.8 for 80-10-10)")
    parser.add_argument("--fwd-bwd-factor", type=float, default=PAPER_FWD_BWD_FACTOR,
                        help="training step = factor x forward (paper: 2; Megatron MFU convention: 3)")
    parser.add_argument("--baseline-arch", default="mlm", choices=ARCHITECTURES)
    parser.add_argument("--baseline-rate", type=float, default=0.15)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    seq_len = args.seq_len or (128 if args.preset == "large" and not args.config else 512)
    try:
        candidate = _config_from_args(args.preset, args.config, args.arch, args.vocab_size)
        baseline = _config_from_args(args.preset, args.config, args.baseline_arch, args.vocab_size)
        reports = []
        for config, rate in ((candidate, args.rate), (baseline, args.baseline_rate)):
            per_sequence = forward_flops(config, seq_len, rate, args.mask_fraction) * args.fwd_bwd_factor
            reports.append(FlopsReport(config.architecture, rate, seq_len, args.batch,
                                       per_sequence * args.batch, per_sequence))
    except (ValueError, OSError, KeyError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    ratio = reports[1].flops_per_step / reports[0].flops_per_step
    if args.json:
        print(json.dumps({"candidate": reports[0].__dict__, "baseline": reports[1].__dict__,
                          "speedup": ratio, "fwd_bwd_factor": args.fwd_bwd_factor,
                          "model": candidate.to_dict()}, indent=2))
    else:
        for label, report in (("candidate", reports[0]), ("baseline ", reports[1])):
            print(f"{label} {report.architecture:<9} r={report.masking_rate:<5} n={seq_len} b={args.batch}: "
                  f"{report.flops_per_step:.4e} FLOPs/step ({report.flops_per_sequence:.4e} per sequence)")
        print(f"speedup of {reports[0].architecture} (r={args.rate}) over {reports[1].architecture} "
              f"(r={args.baseline_rate}): {ratio:.3f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
