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
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPOSITORY))
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from model import ModelConfig, build_model  # noqa: E402
from model.parallel import initialize_single_process  # noqa: E402
from pipeline.data.dataset import build_pretraining_dataloader  # noqa: E402
from pipeline.data.batch import SpecialTokens  # noqa: E402
from pipeline.data.masking import MaskingConfig  # noqa: E402
from pipeline.data.meta import import_indexed_dataset_module, load_meta, split_prefix  # noqa: E402
from pipeline.training.schedule import lr_multiplier  # noqa: E402


def unigram_perplexity(prefix: str, special: SpecialTokens, vocab_size: int) -> float:
    """exp(cross-entropy of the validation tokens under the training split's add-one unigram distribution)."""
    indexed = import_indexed_dataset_module()
    counts = np.ones(vocab_size, dtype=np.float64)
    train = indexed.IndexedDataset(split_prefix(prefix, "train"))
    counts += np.bincount(np.concatenate([np.asarray(train[i], dtype=np.int64) for i in range(len(train))]),
                          minlength=vocab_size)[:vocab_size]
    valid = indexed.IndexedDataset(split_prefix(prefix, "valid"))
    tokens = np.concatenate([np.asarray(valid[i], dtype=np.int64) for i in range(len(valid))])
    tokens = tokens[tokens > max(special.bos, special.pad, special.eos, special.unk, special.mask)]
    log_p = np.log(counts / counts.sum())
    del train, valid  # the arrays above are copies (np.asarray of int64 casts), not views of the mmap
    return float(np.exp(-log_p[tokens].mean()))


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
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--json", help="write the evaluation records here")
    args = parser.parse_args(argv)

    torch.set_num_threads(1)
    initialize_single_process(args.seed)
    meta = load_meta(args.data_prefix)
    special = SpecialTokens(**meta["special_tokens"])
    vocab_size = meta["tokenizer"]["vocab_size"]
    # The demo's model (make demo): 4 x 128 encoder, 1 x 64 decoder, pre-LN.
    config = ModelConfig.preset("tiny", args.architecture, vocab_size=vocab_size, hidden_size=128, ffn_size=512,
                                num_heads=4, num_layers=4, decoder_hidden_size=64, decoder_ffn_size=256,
                                decoder_num_heads=2, decoder_num_layers=1, max_positions=args.seq_len, pre_ln=True)
    model = build_model(config, init_seed=args.seed)
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
    warmup = int(round(0.06 * args.steps))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: lr_multiplier(i, warmup, args.steps))

    def valid_loader():
        return build_pretraining_dataloader(args.data_prefix, "valid", args.seq_len, masking, special, vocab_size,
                                            args.batch, 0, 1, 0, 0, args.seed)

    records = [{"step": 0, **evaluate(model, valid_loader(), args.eval_batches)}]
    unigram = unigram_perplexity(args.data_prefix, special, vocab_size)
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
        path = Path(args.json)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps({"args": vars(args), "unigram_perplexity": unigram, "records": records}, indent=1))
        os.replace(tmp, path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
