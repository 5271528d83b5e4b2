"""``make demo``: the whole pipeline on real English text in a few minutes on 2 CPU cores.

1. text: the English Wikipedia articles that gensim's wheel ships as test data
   (``enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2``), extracted with gensim's own
   wiki utilities (``extract_pages`` + ``filter_wiki``) and kept paragraph by paragraph, plus the 300 Lee
   news documents (``lee_background.cor``);
2. a byte-level BPE tokenizer trained on it (``pipeline.data.tokenizer``);
3. preprocessing into train/valid indexed datasets (``pipeline.data.preprocess``);
4. pre-training a small 3MLself on 2 ranks (torchrun, DP=2, ZeRO-2, fp32 on CPU) with validation along the way
   and a checkpoint at the end (``run_pretrain.py``);
5. the loss/perplexity curves (``pipeline.evaluation.report``).

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
# A model between the `tiny` and `mini` presets: small enough for CPU, big enough to learn visibly.
DEMO_MODEL = {"num_layers": 4, "hidden_size": 128, "ffn_size": 512, "num_heads": 4, "decoder_num_layers": 1,
              "decoder_hidden_size": 64, "decoder_ffn_size": 256, "decoder_num_heads": 2, "max_positions": 128,
              "pre_ln": True}
MIN_PARAGRAPH_CHARS = 80


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
        "--masking-rate", "0.4", "--seq-len", "128", "--global-batch-size", str(args.batch_size),
        "--micro-batch-size", str(args.batch_size // args.ranks), "--train-steps", str(args.steps),
        "--lr", str(args.lr), "--warmup-proportion", "0.06", "--deepspeed_config", "zero2_fp32.json",
        "--log-interval", "5", "--eval-interval", str(max(1, args.steps // 8)), "--eval-iters", "4",
        "--save-interval", str(args.steps), "--num-workers", "0",
    ]
    for key, value in DEMO_MODEL.items():
        command += ["--model-set", f"{key}={json.dumps(value)}"]
    if not sys.stderr.isatty():  # a log file gets one line per logged step instead of bar redraws
        command.append("--no-progress-bar")
    return command


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", default=str(REPO_ROOT / "demo_out"))
    parser.add_argument("--steps", type=int, default=600, help="optimizer steps of the pre-training")
    parser.add_argument("--batch-size", type=int, default=32, help="global batch (sequences of 128 tokens)")
    parser.add_argument("--lr", type=float, default=2e-3, help="peak learning rate")
    parser.add_argument("--ranks", type=int, default=2, help="training processes (data parallel)")
    parser.add_argument("--vocab-size", type=int, default=8000)
    args = parser.parse_args(argv)
    if args.batch_size % args.ranks:
        parser.error("--batch-size must be a multiple of --ranks")

    from pipeline.data.preprocess import PreprocessConfig, preprocess
    from pipeline.evaluation.report import draw, read_metrics
    from pipeline.data.tokenizer import TrainConfig, train_tokenizer

    out = Path(args.output_dir).resolve()
    started = time.perf_counter()
    timings = {}

    def stage(name: str):
        print(f"\n== {name}", flush=True)
        return time.perf_counter()

    t = stage("1/5 English text from gensim's packaged Wikipedia articles and Lee corpus")
    corpus = out / "corpus" / "wiki_lee.jsonl"
    stats = write_corpus(corpus)
    print(f"{stats['wikipedia_articles']} Wikipedia articles + {stats['lee_documents']} Lee documents, "
          f"{stats['characters'] / 1e6:.1f}M characters -> {corpus}")
    timings["text"] = time.perf_counter() - t

    t = stage(f"2/5 byte-level BPE tokenizer (vocab {args.vocab_size})")
    tokenizer = train_tokenizer([corpus], out / "tokenizer" / "tokenizer.json",
                                TrainConfig(vocab_size=args.vocab_size, min_frequency=2))
    print(f"-> {tokenizer}")
    timings["tokenizer"] = time.perf_counter() - t

    t = stage("3/5 preprocessing (train/valid split, indexed datasets)")
    prefix = out / "data" / "wiki_lee"
    preprocess(PreprocessConfig(inputs=[corpus], tokenizer=tokenizer, output_prefix=prefix, input_format="jsonl",
                                valid_fraction=0.05, seed=1234, workers=1, show_progress=False))
    print(f"-> {prefix}_train.bin/.idx, {prefix}_valid.bin/.idx, {prefix}.meta.json")
    timings["preprocess"] = time.perf_counter() - t

    t = stage(f"4/5 pre-training 3MLself ({args.ranks} ranks, ZeRO-2, CPU) for {args.steps} steps")
    run_dir = out / "run"
    shutil.rmtree(run_dir, ignore_errors=True)  # a new demo run, not a resume of the previous one
    command = pretrain_command(args, prefix, tokenizer, run_dir)
    print(" ".join(command), flush=True)
    result = subprocess.run(command, env=child_env(), cwd=str(REPO_ROOT))
    if result.returncode != 0:
        print(f"error: pre-training failed with exit status {result.returncode}", file=sys.stderr)
        return 1
    timings["pretrain"] = time.perf_counter() - t

    t = stage("5/5 loss curves")
    png = draw(run_dir)
    timings["report"] = time.perf_counter() - t

    _, evals = read_metrics(run_dir)
    first, last = evals[0], evals[-1]
    dropped = last["loss"] < first["loss"] - 1.0
    total = time.perf_counter() - started
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    print("\n== done in {:.0f} s ({})".format(total, ", ".join(f"{k} {v:.0f} s" for k, v in timings.items())))
    print(f"validation loss {first['loss']:.3f} (step {first['step']}) -> {last['loss']:.3f} (step {last['step']}); "
          f"perplexity of masked tokens {first['ppl_masked']:.0f} -> {last['ppl_masked']:.0f}"
          + ("" if dropped else "  [WARNING: the validation loss did not drop clearly]"))
    print(f"corpus       {corpus}")
    print(f"tokenizer    {tokenizer}")
    print(f"dataset      {prefix}_{{train,valid}}.{{bin,idx}}, {prefix}.meta.json")
    print(f"run          {run_dir}  (config.json, metrics.jsonl, tensorboard/)")
    print(f"checkpoint   {run_dir / 'checkpoints' / latest}")
    print(f"curves       {png}")
    print(f"tensorboard  tensorboard --logdir {run_dir / 'tensorboard'}")
    return 0 if dropped else 1


if __name__ == "__main__":
    sys.exit(main())
