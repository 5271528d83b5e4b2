"""Experiment: does the 3ML decoder's position / [MASK] embedding initialisation change what the model learns?

``PretrainingModel`` initialises the decoder's position embeddings and its [MASK] embedding at the scale of the
projected encoder output they are added to (std = init_std * sqrt(d_en); ``--init content``, the default),
because at BERT's 0.02 (``--init bert``) they vanish next to it and a copy task that needs positions is never
learned (``tests/test_model_learning.py``). This runs both on real text -- the same data, seed, batches and
steps, one process, plain AdamW (no DeepSpeed: the question is the model's, not the engine's) -- and reports
validation perplexity of masked, replaced and unchanged tokens against the unigram level.

    python -m pipeline preprocess --input ../shared/corpus/*prose*.txt.xz ../shared/corpus/tdavid.txt.xz \\
        --tokenizer TOK --output-prefix DATA/prose --one-doc-per-line --valid-fraction 0.02
    python bench/decoder_init.py --data-prefix DATA/prose --init content --json content.json
    python bench/decoder_init.py --data-prefix DATA/prose --init bert --json bert.json

The other options vary what the demo's model needs to leave the unigram plateau (README, "What the demo shows"): model
shape (``--layers --hidden --head-dim --decoder-layers``), ``--post-ln``, ``--untie``, the encoder's position
table (``--positions sinusoidal``: sin/cos rows at the table's init scale), ``--init-std``, ``--warmup``,
``--no-dropout`` and the decoder's locality prior (``--decoder-locality-bias``, ``ModelConfig.decoder_locality_bias``).
The demo's own settings are ``--no-dropout --masking-rate 0.4 --decoder-locality-bias 1.0 --steps 600``.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPOSITORY))
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

from model import ModelConfig, build_model  # noqa: E402
from model.parallel import initialize_single_process  # noqa: E402
from pipeline.data.dataset import build_pretraining_dataloader  # noqa: E402
from pipeline.data.batch import SpecialTokens  # noqa: E402
from pipeline.data.masking import MaskingConfig  # noqa: E402
from pipeline.data.meta import load_meta  # noqa: E402
from pipeline.evaluation.report import unigram_perplexity  # noqa: E402
from pipeline.io import write_json_atomic  # noqa: E402
from pipeline.training.schedule import lr_multiplier  # noqa: E402


def sinusoidal_table(rows: int, width: int, std: float) -> torch.Tensor:
    """The Transformer's sin/cos position rows, scaled to standard deviation ``std``."""
    angle = torch.arange(rows).float()[:, None] / 10000 ** (torch.arange(0, width, 2).float() / width)
    table = torch.stack([angle.sin(), angle.cos()], dim=-1).flatten(1)[:, :width]
    return table * (std / table.std())


def evaluate(model, loader, batches: int) -> dict[str, float]:
    model.eval()
    sums, counts = torch.zeros(3), torch.zeros(3)
    with torch.no_grad():
        for index, batch in enumerate(loader):
            if index == batches:
                break
            output = model(batch)
            sums += output.loss_sum_by_kind
            counts += output.count_by_kind
    model.train()
    return {f"ppl_{kind}": math.exp(float(sums[i] / counts[i].clamp(min=1)))
            for i, kind in enumerate(("masked", "replaced", "unchanged"))}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-prefix", required=True)
    parser.add_argument("--init", choices=("content", "bert"), default="content")
    parser.add_argument("--architecture", default="3ml-self")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--masking-rate", type=float, default=0.4)
    parser.add_argument("--eval-interval", type=int, default=500)
    parser.add_argument("--eval-batches", type=int, default=40)
    parser.add_argument("--warmup", type=float, default=0.06, help="warm-up fraction of the steps")
    parser.add_argument("--layers", type=int, default=4, help="encoder layers")
    parser.add_argument("--hidden", type=int, default=128, help="encoder width (FFN 4x; decoder half width)")
    parser.add_argument("--head-dim", type=int, default=32, help="attention head width (heads = width / it)")
    parser.add_argument("--decoder-layers", type=int, default=2)
    parser.add_argument("--post-ln", action="store_true", help="BERT's post-LN instead of pre-LN")
    parser.add_argument("--untie", action="store_true", help="an output matrix of its own, not the word embeddings")
    parser.add_argument("--init-std", type=float, default=0.02)
    parser.add_argument("--positions", choices=("learned", "sinusoidal"), default="learned",
                        help="initial encoder (and decoder) position tables: normal(0, std) or sin/cos rows "
                             "scaled to the same std (still learned)")
    parser.add_argument("--decoder-locality-bias", type=float, default=0.0,
                        help="slope of the decoder's -slope*|i-j| attention bias (0: none, the paper)")
    parser.add_argument("--no-dropout", action="store_true", help="hidden and attention dropout 0 (the demo's)")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--json", help="write the evaluation records here")
    args = parser.parse_args(argv)

    torch.set_num_threads(1)
    initialize_single_process(args.seed)
    meta = load_meta(args.data_prefix)
    special = SpecialTokens(**meta["special_tokens"])
    vocab_size = meta["tokenizer"]["vocab_size"]
    # The demo's model (make demo): 4 x 128 encoder, 2 x 64 decoder, pre-LN.
    width = args.hidden
    config = ModelConfig.preset("tiny", args.architecture, vocab_size=vocab_size, hidden_size=width,
                                ffn_size=4 * width, num_heads=width // args.head_dim, num_layers=args.layers,
                                decoder_hidden_size=width // 2, decoder_ffn_size=2 * width,
                                decoder_num_heads=max(1, width // (2 * args.head_dim)),
                                decoder_num_layers=args.decoder_layers, max_positions=args.seq_len,
                                pre_ln=not args.post_ln, tie_embeddings=not args.untie, init_std=args.init_std,
                                decoder_locality_bias=args.decoder_locality_bias,
                                **({"hidden_dropout": 0.0, "attention_dropout": 0.0} if args.no_dropout else {}))
    model = build_model(config, init_seed=args.seed)
    if args.positions == "sinusoidal":
        tables = [model.encoder.embeddings.position_embeddings.weight]
        tables += [model.decoder.position_embeddings.weight] if model.decoder is not None else []
        with torch.no_grad():
            for table in tables:
                table.copy_(sinusoidal_table(*table.shape, float(table.std())))
    if args.init == "bert" and model.decoder is not None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(args.seed + 1)
            torch.nn.init.normal_(model.decoder.position_embeddings.weight, 0.0, config.init_std)
            torch.nn.init.normal_(model.decoder.mask_embedding, 0.0, config.init_std)
    masking = MaskingConfig(rate=args.masking_rate, seed=args.seed)
    train = build_pretraining_dataloader(args.data_prefix, "train", args.seq_len, masking, special, vocab_size,
                                         args.batch, 0, 1, 0, 0, args.seed, total_samples=args.steps * args.batch)
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
                                  lr=args.lr, betas=(0.9, 0.98), eps=1e-6)
    warmup = int(round(args.warmup * args.steps))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: lr_multiplier(i, warmup, args.steps))

    def valid_loader():
        return build_pretraining_dataloader(args.data_prefix, "valid", args.seq_len, masking, special, vocab_size,
                                            args.batch, 0, 1, 0, 0, args.seed)

    records = [{"step": 0, **evaluate(model, valid_loader(), args.eval_batches)}]
    unigram = unigram_perplexity(args.data_prefix)
    print(f"init {args.init}: unigram perplexity {unigram:.0f}; step 0 {records[0]}", flush=True)
    start = time.time()
    for step, batch in enumerate(train, start=1):
        loss = model(batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if step % args.eval_interval == 0 or step == args.steps:
            records.append({"step": step, "train_loss": float(loss.detach()), **evaluate(model, valid_loader(),
                                                                                 args.eval_batches)})
            print(f"init {args.init} step {step} ({time.time() - start:.0f} s): {records[-1]}", flush=True)
        if step == args.steps:
            break
    if args.json:
        write_json_atomic(args.json, {"args": vars(args), "unigram_perplexity": unigram, "records": records})
    return 0


if __name__ == "__main__":
    sys.exit(main())
