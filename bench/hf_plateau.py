"""Reference: does Hugging Face's own RoBERTa leave the unigram plateau where ours does not (README, "What the
demo shows")?

transformers' ``RobertaForMaskedLM`` of the demo's encoder shape, trained with plain AdamW on the raw token stream
of a preprocessed dataset: documents concatenated in order, cut into sequences of ``--seq-len``, corrupted here in
a few lines of torch (BERT's rule: each token chosen with probability ``--masking-rate``; of those 80% become
``<mask>``, 10% a random ordinary token, 10% stay). Nothing of our model, masking or data loader is used, only the
dataset files and ``pipeline.evaluation.report.unigram_perplexity`` for the dashed line. It reports the perplexity
of the ``<mask>`` tokens of fixed validation (and train) sequences against the unigram perplexity:

    python bench/hf_plateau.py --data-prefix demo_out/data/wiki_lee --steps 600 --json hf_plateau.json
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

import numpy as np  # noqa: E402
import torch  # noqa: E402

from pipeline.data.dataset import open_indexed_dataset  # noqa: E402
from pipeline.data.meta import load_meta, split_prefix  # noqa: E402
from pipeline.evaluation.report import unigram_perplexity  # noqa: E402
from pipeline.io import write_json_atomic  # noqa: E402
from pipeline.training.schedule import lr_multiplier  # noqa: E402

ORDINARY_FROM = 5  # ids 0-4 are the RoBERTa specials (pipeline.data.tokenizer)


def token_sequences(prefix: str, split: str, seq_len: int) -> torch.Tensor:
    """The split's documents end to end, cut into ``[N, seq_len]`` (the tail shorter than one sequence dropped)."""
    dataset = open_indexed_dataset(split_prefix(prefix, split))
    stream = np.concatenate([np.asarray(dataset[i], dtype=np.int64) for i in range(len(dataset))])
    count = len(stream) // seq_len
    return torch.from_numpy(stream[: count * seq_len].reshape(count, seq_len).copy())


def corrupt(ids: torch.Tensor, rate: float, mask_id: int, vocab_size: int, generator: torch.Generator):
    """BERT's corruption of ``ids``: (inputs, labels with -100 where not chosen, bool of the <mask>ed positions)."""
    chosen = torch.rand(ids.shape, generator=generator) < rate
    draw = torch.rand(ids.shape, generator=generator)
    masked = chosen & (draw < 0.8)
    replaced = chosen & (draw >= 0.8) & (draw < 0.9)
    inputs = ids.clone()
    inputs[masked] = mask_id
    inputs[replaced] = torch.randint(ORDINARY_FROM, vocab_size, (int(replaced.sum()),), generator=generator)
    labels = torch.where(chosen, ids, torch.full_like(ids, -100))
    return inputs, labels, masked


def masked_perplexity(model, sequences: torch.Tensor, args, mask_id: int, vocab_size: int) -> float:
    """Perplexity of the <mask>ed tokens of the first ``--eval-sequences`` sequences, with a fixed corruption."""
    generator = torch.Generator().manual_seed(args.seed + 99)
    loss_sum, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for start in range(0, min(len(sequences), args.eval_sequences), args.batch):
            inputs, labels, masked = corrupt(sequences[start:start + args.batch], args.masking_rate, mask_id,
                                             vocab_size, generator)
            logits = model(input_ids=inputs).logits
            loss_sum += float(torch.nn.functional.cross_entropy(logits[masked], labels[masked], reduction="sum"))
            count += int(masked.sum())
    model.train()
    return math.exp(loss_sum / count)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-prefix", required=True)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--warmup", type=float, default=0.06, help="warm-up fraction of the steps")
    parser.add_argument("--masking-rate", type=float, default=0.4)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=128, help="width (FFN 4x, heads of 32)")
    parser.add_argument("--eval-interval", type=int, default=100)
    parser.add_argument("--eval-sequences", type=int, default=256)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--json", help="write the evaluation records here")
    args = parser.parse_args(argv)

    from transformers import RobertaConfig, RobertaForMaskedLM

    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    meta = load_meta(args.data_prefix)
    vocab_size, specials = meta["tokenizer"]["vocab_size"], meta["special_tokens"]
    train, valid = (token_sequences(args.data_prefix, split, args.seq_len) for split in ("train", "valid"))
    config = RobertaConfig(vocab_size=vocab_size, hidden_size=args.hidden, num_hidden_layers=args.layers,
                           num_attention_heads=args.hidden // 32, intermediate_size=4 * args.hidden,
                           max_position_embeddings=args.seq_len + specials["pad"] + 1, type_vocab_size=1,
                           hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, pad_token_id=specials["pad"],
                           bos_token_id=specials["bos"], eos_token_id=specials["eos"])
    model = RobertaForMaskedLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.01)
    warmup = int(round(args.warmup * args.steps))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: lr_multiplier(i, warmup, args.steps))
    unigram = unigram_perplexity(args.data_prefix)

    def record(step: int) -> dict:
        return {"step": step,
                "ppl_masked": masked_perplexity(model, valid, args, specials["mask"], vocab_size),
                "ppl_masked_train": masked_perplexity(model, train, args, specials["mask"], vocab_size)}

    records = [record(0)]
    print(f"unigram perplexity {unigram:.0f}; {len(train)} train / {len(valid)} valid sequences; {records[0]}",
          flush=True)
    generator = torch.Generator().manual_seed(args.seed)
    start = time.time()
    for step in range(1, args.steps + 1):
        rows = torch.randint(0, len(train), (args.batch,), generator=generator)
        inputs, labels, _ = corrupt(train[rows], args.masking_rate, specials["mask"], vocab_size, generator)
        loss = model(input_ids=inputs, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if step % args.eval_interval == 0 or step == args.steps:
            records.append(record(step))
            print(f"step {step} ({time.time() - start:.0f} s): masked {records[-1]['ppl_masked']:.0f} = "
                  f"{records[-1]['ppl_masked'] / unigram:.3f} x unigram", flush=True)
    if args.json:
        write_json_atomic(args.json, {"args": vars(args), "unigram_perplexity": unigram, "records": records})
    return 0


if __name__ == "__main__":
    sys.exit(main())
