"""``make demo``: the whole pipeline on real English text in a few minutes on 2 CPU cores.

1. text: the English Wikipedia articles that gensim's wheel ships as test data
   (``enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2``), extracted with gensim's own
   wiki utilities (``extract_pages`` + ``filter_wiki``) and kept paragraph by paragraph, plus the 300 Lee
   news documents (``lee_background.cor``);
2. a byte-level BPE tokenizer trained on it (``pipeline.data.tokenizer``);
3. preprocessing into train/valid indexed datasets (``pipeline.data.preprocess``);
4. pre-training a small 3MLself on 2 ranks (torchrun, DP=2, ZeRO-2, fp32 on CPU) with validation along the way
   and a checkpoint at the end (``run_pretrain.py``);
5. the loss/perplexity curves with the unigram level of the validation split (``pipeline.evaluation.report``):
   a masked-token perplexity below it means the model predicts from context, not from word frequencies alone
   (the demo's decoder has a locality prior, ``decoder_locality_bias``, without which this model sits at that
   level for ~1,750 steps: README, "What the demo shows");
6. the export of the checkpoint with its decoder (``python -m pipeline export --with-decoder``) and mask
   infilling with the exported full model on three held-back sentences of the validation split.

Everything goes to ``demo_out/`` (``--output-dir``); the paths are printed at the end.
"""

from __future__ import annotations

import argparse
import bz2
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator, Sequence

REPO_ROOT = Path(__file__).resolve().parent.parent
WIKI_DUMP = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
LEE_CORPUS = "lee_background.cor"
# A model between the `tiny` and `mini` presets: small enough for CPU, big enough to learn visibly. The decoder
# is the paper's (2 layers, half width) with a locality prior on its attention (ModelConfig.decoder_locality_bias):
# without it the model sits at the unigram plateau for ~1,750 steps, far past this budget (README).
DEMO_MODEL = {"num_layers": 4, "hidden_size": 128, "ffn_size": 512, "num_heads": 4, "decoder_num_layers": 2,
              "decoder_hidden_size": 64, "decoder_ffn_size": 256, "decoder_num_heads": 2, "max_positions": 128,
              "pre_ln": True, "hidden_dropout": 0.0, "attention_dropout": 0.0, "decoder_locality_bias": 1.0}
MIN_PARAGRAPH_CHARS = 80
SEQ_LEN = 128
MASKING_RATE = 0.4
WARMUP = 0.06
DEMO_VOCAB = 2000
DEMO_STEPS = 600
# `make demo-long`: the same demo, 4,000 steps (README: how far the model gets with a longer budget).
DEMO_LONG_STEPS = 4000
DEMO_BATCH = 32
DEMO_LR = 2e-3
CONTEXT_RATIO = 0.8  # masked-token perplexity at or below 0.8 x unigram: clearly predicting from context
INFILL_SENTENCES = 3
INFILL_EVERY = 5  # mask every 5th word piece of a held-back sentence (20%)


def gensim_test_data() -> Path:
    import gensim

    return Path(gensim.__file__).parent / "test" / "test_data"


def wikipedia_articles(dump: Path) -> Iterator[tuple[str, list[str]]]:
    """(title, paragraphs) of the articles of a MediaWiki XML dump, markup removed by gensim's filter_wiki."""
    from gensim.corpora.wikicorpus import extract_pages, filter_wiki

    with bz2.open(dump, "rb") as stream:
        for title, text, _ in extract_pages(stream):
            if not text or text.lstrip().lower().startswith("#redirect"):
                continue
            plain = re.sub(r"'{2,}", "", filter_wiki(text))  # bold/italic quote marks survive filter_wiki
            paragraphs = []
            for block in re.split(r"\n\s*\n", plain):
                block = re.sub(r"\s+", " ", block).strip()
                # Leftover table rows, lists of links and headings are not running text.
                if len(block) >= MIN_PARAGRAPH_CHARS and not block.startswith(("|", "{", "!", "*", "=", "#")):
                    paragraphs.append(block)
            if paragraphs:
                yield title, paragraphs


def write_corpus(path: Path) -> dict:
    """One JSONL document per Wikipedia article (paragraphs joined by newlines) and per Lee news story."""
    data = gensim_test_data()
    stats = {"wikipedia_articles": 0, "lee_documents": 0, "characters": 0}
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as out:
        for _, paragraphs in wikipedia_articles(data / WIKI_DUMP):
            text = "\n".join(paragraphs)
            out.write(json.dumps({"text": text}) + "\n")
            stats["wikipedia_articles"] += 1
            stats["characters"] += len(text)
        for line in (data / LEE_CORPUS).read_text(encoding="utf-8", errors="replace").splitlines():
            if line.strip():
                out.write(json.dumps({"text": line.strip()}) + "\n")
                stats["lee_documents"] += 1
                stats["characters"] += len(line)
    return stats


def child_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in [str(REPO_ROOT), env.get("PYTHONPATH", "")] if p)
    env.setdefault("DS_ACCELERATOR", "cpu")
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO_ROOT / ".cache" / "torch_extensions"))
    env.setdefault("PYTHONWARNINGS", "ignore")
    return env


def pretrain_command(args, dataset_prefix: Path, tokenizer: Path, run_dir: Path) -> list[str]:
    from pipeline.training.distributed import free_port

    torchrun = Path(sys.executable).parent / "torchrun"
    launcher = [str(torchrun)] if torchrun.exists() else [sys.executable, "-m", "torch.distributed.run"]
    command = launcher + [
        f"--nproc_per_node={args.ranks}", "--master_addr=127.0.0.1", f"--master_port={free_port()}",
        str(REPO_ROOT / "run_pretrain.py"),
        "--data-prefix", str(dataset_prefix), "--tokenizer", str(tokenizer), "--save", str(run_dir),
        "--architecture", "3ml-self", "--model-preset", "tiny",
        "--masking-rate", str(MASKING_RATE), "--seq-len", str(SEQ_LEN), "--global-batch-size", str(args.batch_size),
        "--micro-batch-size", str(args.batch_size // args.ranks), "--train-steps", str(args.steps),
        "--lr", str(args.lr), "--warmup-proportion", str(WARMUP), "--deepspeed_config", "zero2_fp32.json",
        "--log-interval", "5", "--eval-interval", str(max(1, args.steps // 8)), "--eval-iters", "4",
        "--save-interval", str(args.steps), "--num-workers", "0",
    ]
    for key, value in DEMO_MODEL.items():
        command += ["--model-set", f"{key}={json.dumps(value)}"]
    if not sys.stderr.isatty():  # a log file gets one line per logged step instead of bar redraws
        command.append("--no-progress-bar")
    return command


def held_back_sentences(prefix: Path, tokenizer_file: Path, count: int) -> list[str]:
    """``count`` sentences of running text (10-30 words) from different documents of the validation split,
    which pre-training never sees."""
    from pipeline.data.dataset import open_indexed_dataset
    from pipeline.data.meta import split_prefix
    from pipeline.data.tokenizer import load_raw_tokenizer

    tokenizer = load_raw_tokenizer(tokenizer_file)
    valid = open_indexed_dataset(split_prefix(prefix, "valid"))
    sentences = []
    for index in range(len(valid)):
        text = tokenizer.decode([int(t) for t in valid[index]], skip_special_tokens=True)
        for sentence in re.split(r"(?<=[.!?])\s+", text):
            words = sentence.split()
            if 10 <= len(words) <= 30 and sentence.endswith(".") and sum(w.isalpha() for w in words) >= 0.7 * len(words):
                sentences.append(sentence)
                break
        if len(sentences) == count:
            break
    return sentences


def infill(export_dir: Path, sentences: Sequence[str], every: int = INFILL_EVERY, top: int = 3) -> list[dict]:
    """Mask every ``every``-th word piece of each sentence and predict it with the exported full model
    (``load_full_model``): per sentence the masked text and, per masked piece, the true piece and the top
    predictions with their probabilities."""
    import numpy as np
    import torch
    from transformers import AutoTokenizer

    from pipeline.data.batch import IGNORE_INDEX, KIND_MASKED, KIND_NONE
    from pipeline.data.masking import MaskedSample, MaskingConfig, collate
    from pipeline.evaluation.export import load_full_model

    model = load_full_model(export_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(export_dir))
    captured = []

    # The model returns losses only; the logits are rebuilt from what its output layer is given (the tied
    # word embeddings and its bias), the same product its loss is computed from.
    def keep_logits(module, inputs, _output):
        hidden, _, embedding_weight = inputs
        weight = embedding_weight if module.weight is None else module.weight
        logits = torch.nn.functional.linear(hidden, weight, module.bias)[..., :model.config.vocab_size]
        captured.append(logits.float().softmax(-1))

    hook = model.output_layer.register_forward_hook(keep_logits)
    results = []
    try:
        for sentence in sentences:
            ids = np.array(tokenizer(sentence)["input_ids"], dtype=np.int64)
            positions = np.arange(1, ids.size - 1)[::every]  # never <s> or </s>
            input_ids, labels = ids.copy(), np.full_like(ids, IGNORE_INDEX)
            input_ids[positions], labels[positions] = tokenizer.mask_token_id, ids[positions]
            corruption = np.full(ids.shape, KIND_NONE, dtype=np.int8)
            corruption[positions] = KIND_MASKED
            batch = collate([MaskedSample(input_ids, labels, corruption, 0)], MaskingConfig(rate=0.5),
                            tokenizer.pad_token_id)
            captured.clear()
            with torch.no_grad():
                model(batch)
            probabilities = captured[-1][0, :positions.size]  # pred_positions are ascending, valid ones first
            best = probabilities.topk(top, dim=-1)
            pieces = [tokenizer.decode([int(t)]) for t in ids]
            hidden = set(positions.tolist())
            masked_text = "".join((" " if pieces[i].startswith(" ") else "") + "[" + "_" * max(1, len(pieces[i].strip()))
                                  + "]" if i in hidden else pieces[i] for i in range(1, ids.size - 1))
            rows = [{"true": pieces[p], "predictions": [(tokenizer.decode([int(t)]), float(q))
                                                         for t, q in zip(best.indices[k], best.values[k])]}
                    for k, p in enumerate(positions)]
            results.append({"sentence": sentence, "masked": masked_text.strip(), "rows": rows})
    finally:
        hook.remove()
    return results


def print_infilling(results: list[dict], frequent: str | None = None) -> tuple[int, int, int]:
    """Prints each sentence with its masks and the predictions; returns (top-1 correct, masked pieces, how many
    of them are ``frequent``, the guess of a model that knows word frequencies only)."""
    correct = total = frequent_hits = 0
    for number, result in enumerate(results, 1):
        print(f"\n[{number}] {result['masked']}")
        print(f"    {'true':>14}   top predictions (probability)")
        for row in result["rows"]:
            hit = row["predictions"][0][0] == row["true"]
            correct, total = correct + hit, total + 1
            frequent_hits += row["true"] == frequent
            guesses = ", ".join(f"{piece!r} {p:.2f}" for piece, p in row["predictions"])
            print(f"  {'*' if hit else ' '} {row['true']!r:>14}   {guesses}")
    return correct, total, frequent_hits


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", default=str(REPO_ROOT / "demo_out"))
    parser.add_argument("--steps", type=int, help=f"optimizer steps of the pre-training [default: {DEMO_STEPS}, "
                        f"with --long {DEMO_LONG_STEPS}]")
    parser.add_argument("--long", action="store_true",
                        help=f"{DEMO_LONG_STEPS} steps (~15 minutes on 2 idle cores, what `make demo-long` runs)")
    parser.add_argument("--batch-size", type=int, default=DEMO_BATCH, help=f"global batch (sequences of {SEQ_LEN} "
                        "tokens)")
    parser.add_argument("--lr", type=float, default=DEMO_LR, help="peak learning rate")
    parser.add_argument("--ranks", type=int, default=2, help="training processes (data parallel)")
    parser.add_argument("--vocab-size", type=int, default=DEMO_VOCAB)
    args = parser.parse_args(argv)
    if args.batch_size % args.ranks:
        parser.error("--batch-size must be a multiple of --ranks")
    if args.steps is None:
        args.steps = DEMO_LONG_STEPS if args.long else DEMO_STEPS
    elif args.steps < 1:
        parser.error("--steps must be positive")

    from pipeline.data.preprocess import PreprocessConfig, preprocess
    from pipeline.data.tokenizer import TrainConfig, load_raw_tokenizer, train_tokenizer
    from pipeline.evaluation.report import corruptible_token_counts, draw, read_metrics, unigram_perplexity

    out = Path(args.output_dir).resolve()
    started = time.perf_counter()
    timings = {}

    def stage(name: str):
        print(f"\n== {name}", flush=True)
        return time.perf_counter()

    t = stage("1/6 English text from gensim's packaged Wikipedia articles and Lee corpus")
    corpus = out / "corpus" / "wiki_lee.jsonl"
    stats = write_corpus(corpus)
    print(f"{stats['wikipedia_articles']} Wikipedia articles + {stats['lee_documents']} Lee documents, "
          f"{stats['characters'] / 1e6:.1f}M characters -> {corpus}")
    timings["text"] = time.perf_counter() - t

    t = stage(f"2/6 byte-level BPE tokenizer (vocab {args.vocab_size})")
    tokenizer = train_tokenizer([corpus], out / "tokenizer" / "tokenizer.json",
                                TrainConfig(vocab_size=args.vocab_size, min_frequency=2))
    print(f"-> {tokenizer}")
    timings["tokenizer"] = time.perf_counter() - t

    t = stage("3/6 preprocessing (train/valid split, indexed datasets)")
    prefix = out / "data" / "wiki_lee"
    preprocess(PreprocessConfig(inputs=[corpus], tokenizer=tokenizer, output_prefix=prefix, input_format="jsonl",
                                valid_fraction=0.05, seed=1234, workers=1, show_progress=False))
    unigram = unigram_perplexity(prefix)
    print(f"-> {prefix}_train.bin/.idx, {prefix}_valid.bin/.idx, {prefix}.meta.json; unigram perplexity of the "
          f"validation split {unigram:.0f} (word frequencies alone, no context)")
    timings["preprocess"] = time.perf_counter() - t

    t = stage(f"4/6 pre-training 3MLself ({args.ranks} ranks, ZeRO-2, CPU) for {args.steps} steps")
    run_dir = out / "run"
    shutil.rmtree(run_dir, ignore_errors=True)  # a new demo run, not a resume of the previous one
    command = pretrain_command(args, prefix, tokenizer, run_dir)
    print(" ".join(command), flush=True)
    result = subprocess.run(command, env=child_env(), cwd=str(REPO_ROOT))
    if result.returncode != 0:
        print(f"error: pre-training failed with exit status {result.returncode}", file=sys.stderr)
        return 1
    timings["pretrain"] = time.perf_counter() - t

    t = stage("5/6 loss curves")
    png = draw(run_dir, unigram_ppl=unigram)
    timings["report"] = time.perf_counter() - t

    t = stage("6/6 export with the decoder, and mask infilling on held-back sentences")
    export_dir = out / "export"
    command = [sys.executable, "-m", "pipeline", "export", str(run_dir), "--output", str(export_dir),
               "--with-decoder", "--overwrite"]
    print(" ".join(command), flush=True)
    if subprocess.run(command, env=child_env(), cwd=str(REPO_ROOT)).returncode != 0:
        print("error: export failed", file=sys.stderr)
        return 1
    counts = corruptible_token_counts(prefix, "train")
    frequent = load_raw_tokenizer(tokenizer).decode([int(counts.argmax())])
    correct, total, frequent_hits = print_infilling(
        infill(export_dir, held_back_sentences(prefix, tokenizer, INFILL_SENTENCES)), frequent)
    print(f"\ntop-1 correct: {correct} of {total} masked pieces (* above); always guessing the most frequent piece "
          f"{frequent!r} (word frequencies alone) would get {frequent_hits}")
    timings["export+infill"] = time.perf_counter() - t

    _, evals = read_metrics(run_dir)
    first, last = evals[0], evals[-1]
    ratio = last["ppl_masked"] / unigram
    learned = ratio < 1.0
    total_s = time.perf_counter() - started
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    print("\n== done in {:.0f} s ({})".format(total_s, ", ".join(f"{k} {v:.0f} s" for k, v in timings.items())))
    print(f"validation loss {first['loss']:.3f} (step {first['step']}) -> {last['loss']:.3f} (step {last['step']})")
    if ratio <= CONTEXT_RATIO:
        verdict = "  (well below it: the model predicts from context)"
    elif learned:
        verdict = ("  (below it, not yet far: the model has learned word frequencies and to copy visible tokens, and "
                   "has started to use the context; more steps take it further)")
    else:
        verdict = ("  (not below it: the model has learned word frequencies and to copy visible tokens, not yet to "
                   "use the context; README, \"What the demo shows\")")
    print(f"perplexity of masked tokens {first['ppl_masked']:.0f} -> {last['ppl_masked']:.0f} = {ratio:.2f} x the "
          f"unigram perplexity {unigram:.0f}{verdict}")
    print(f"corpus       {corpus}")
    print(f"tokenizer    {tokenizer}")
    print(f"dataset      {prefix}_{{train,valid}}.{{bin,idx}}, {prefix}.meta.json")
    print(f"run          {run_dir}  (config.json, metrics.jsonl, tensorboard/)")
    print(f"checkpoint   {run_dir / 'checkpoints' / latest}")
    print(f"export       {export_dir}  (encoder: Hugging Face RoBERTa; 3ml/: the full model for infilling)")
    print(f"curves       {png}")
    print(f"tensorboard  tensorboard --logdir {run_dir / 'tensorboard'}")
    return 0  # every stage ran; whether the model got below the unigram level is the verdict printed above


if __name__ == "__main__":
    sys.exit(main())
