"""Equal-compute comparison of MLM and 3ML: pre-train -> export -> fine-tune, one command.

For each of MLM-15%, 3MLself-50%, 3MLcross-50% and MLM-50% (the paper's second baseline), on the same data, with
the same seed, model shape and learning-rate schedule shape, and the SAME pre-training FLOPs (paper Appendix D,
``pipeline.training.flops``; the MLM-15% run's steps set the budget and every other run gets
``round(budget / its FLOPs per step)`` steps), this

1. pre-trains with ``run_pretrain.py`` (torchrun; DeepSpeed ZeRO-2), validating along the way;
2. exports the encoder (``python -m pipeline export``);
3. fine-tunes it on two sentiment tasks made from human-rated English sentences (``--labeled-dir``, files
   ``*_GroundTruth.txt``: ``id<TAB>score<TAB>text``, scores -4..+4): ``sentiment-sign`` (classification by the
   sign of the score, sentences with ``|score| >= 1`` only; accuracy) and ``sentiment-score`` (regression on the
   score; mean of Pearson and Spearman), with several seeds (``python -m pipeline finetune``, custom tasks);

then writes a table (markdown + JSON) and a plot: downstream score against pre-training FLOPs (every seed a
dot, the median a marker) and the runs' validation curves (masked-token perplexity against FLOPs, with the
unigram level) side by side.

    python bench/compare.py --preset cpu            # ../shared/corpus prose + ../shared/labeled; ~30 min, 2 cores
    python bench/compare.py --preset gpu            # one GPU, <= 8 min (sized, not yet run)
    python bench/compare.py --preset tiny --corpus TEXT --labeled-dir DIR   # CI (tests/test_compare.py)

Outputs: ``--work-dir`` (runs, exports, fine-tuning) and ``--results-dir`` (default bench/results):
``compare_<preset>.json``, ``compare_<preset>.md``, ``compare_<preset>.png``. A finished stage is reused when
the command is run again with the same settings (its outputs are complete), so an interrupted comparison
continues where it stopped.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import lzma
import math
import os
import random
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

REPOSITORY = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPOSITORY))

from model.config import ModelConfig  # noqa: E402
from pipeline.errors import ConfigError, DataError, PipelineError, run_cli  # noqa: E402
from pipeline.io import write_text_atomic  # noqa: E402

# (name, architecture, masking rate): the paper's comparison (Table 1/2: 3MLself-50% against RoBERTa's 15%,
# and MLM at 50% to separate "mask more" from "mask later").
MODELS = (("MLM-15%", "mlm", 0.15), ("3MLself-50%", "3ml-self", 0.5), ("3MLcross-50%", "3ml-cross", 0.5),
          ("MLM-50%", "mlm", 0.5))
BUDGET_MODEL = "MLM-15%"
# The downstream tasks: the fine-tuning CLI's custom-task options for each.
TASKS = {"sentiment-sign": {"regression": False, "metrics": "acc"},
         "sentiment-score": {"regression": True, "metrics": "pearson,spearman"}}
PROSE_FILES = ("linuxdoc_prose.txt.xz", "pydoc_prose.txt.xz", "tdavid.txt.xz")
MIN_SIGN_SCORE = 1.0
FLOPS_TOLERANCE = 0.02


@dataclass(frozen=True)
class Preset:
    """One size of the comparison. Every field is used by every model alike."""

    model: dict
    """``--model-set`` overrides of ModelConfig's ``tiny`` preset (encoder and 3ML decoder shape)."""
    vocab_size: int
    """Byte-level BPE vocabulary trained on the pre-training text."""
    corpus_bytes: int
    """Characters of pre-training text taken from the corpus files (split evenly between them)."""
    seq_len: int
    batch: int
    """Global batch (sequences per optimizer step)."""
    budget_steps: int
    """Steps of the MLM-15% run; its FLOPs are the budget every model gets."""
    lr: float
    warmup: float
    ranks: int
    """Data-parallel training processes (torchrun --nproc_per_node)."""
    deepspeed_config: str
    evals: int
    """Validations per run (the curves)."""
    eval_iters: int
    finetune_lr: float
    finetune_batch: int
    finetune_epochs: int
    finetune_seeds: int
    finetune_max_train: int
    """Training examples per task (0: all)."""
    finetune_max_length: int
    device: str
    """Fine-tuning device."""
    tasks: tuple[str, ...] = ("sentiment-sign", "sentiment-score")
    """Downstream tasks fine-tuned (``TASKS``)."""

    def __post_init__(self):
        for name in ("vocab_size", "corpus_bytes", "seq_len", "batch", "budget_steps", "ranks", "evals",
                     "eval_iters", "finetune_batch", "finetune_epochs", "finetune_seeds", "finetune_max_length"):
            if getattr(self, name) < 1:
                raise ConfigError(f"preset field {name} must be >= 1, got {getattr(self, name)}")
        if self.batch % self.ranks:
            raise ConfigError(f"preset batch {self.batch} is not a multiple of ranks {self.ranks}")
        if not self.tasks or set(self.tasks) - set(TASKS):
            raise ConfigError(f"preset tasks {self.tasks} must be a non-empty subset of {tuple(TASKS)}")
        if not 0 < self.lr < 1 or not 0 < self.finetune_lr < 1 or not 0 <= self.warmup < 1:
            raise ConfigError("preset learning rates must be in (0, 1) and warmup in [0, 1)")


# The paper's 3ML decoder (2 layers, half the encoder's width). No dropout: a run this short sees its data
# less than twice, and dropout 0.1 slowed 3MLself's learning to copy visible tokens (unchanged-token
# perplexity 250 against 1.8 for 3MLcross in the first cpu run, 2026-11-29) -- Cramming's choice for short
# budgets, applied to every model alike.
SMALL_MODEL = {"num_layers": 4, "hidden_size": 128, "ffn_size": 512, "num_heads": 4, "decoder_num_layers": 2,
               "decoder_hidden_size": 64, "decoder_ffn_size": 256, "decoder_num_heads": 2, "max_positions": 128,
               "pre_ln": True, "hidden_dropout": 0.0, "attention_dropout": 0.0}
PRESETS = {
    # CI: every stage runs for every model, nothing is expected to be learned; one task (each fine-tuning is
    # a process start with transformers' import).
    "tiny": Preset(model={"num_layers": 2, "hidden_size": 64, "ffn_size": 128, "num_heads": 2,
                          "decoder_num_layers": 1, "decoder_hidden_size": 32, "decoder_ffn_size": 64,
                          "decoder_num_heads": 2, "max_positions": 64, "pre_ln": True},
                   vocab_size=500, corpus_bytes=400_000, seq_len=64, batch=8, budget_steps=60, lr=2e-3, warmup=0.1,
                   ranks=1, deepspeed_config="zero2_fp32.json", evals=2, eval_iters=2, finetune_lr=1e-3,
                   finetune_batch=16, finetune_epochs=1, finetune_seeds=2, finetune_max_train=200,
                   finetune_max_length=32, device="cpu", tasks=("sentiment-sign",)),
    # 2 CPU cores, ~25 minutes when idle: the demo's model shape on 6 MB of prose.
    "cpu": Preset(model=SMALL_MODEL, vocab_size=4000, corpus_bytes=6_000_000, seq_len=128, batch=32,
                  budget_steps=600, lr=2e-3, warmup=0.06, ranks=2, deepspeed_config="zero2_fp32.json", evals=6,
                  eval_iters=8, finetune_lr=3e-4, finetune_batch=32, finetune_epochs=2, finetune_seeds=3,
                  finetune_max_train=3000, finetune_max_length=64, device="cpu"),
    # One H200, <= 8 minutes: sized by estimate from the H100 throughput in README's Performance section
    # (a model ~1/20 of large's FLOPs per token: host-bound, ~25 ms/step), not yet run on a GPU.
    "gpu": Preset(model={"num_layers": 6, "hidden_size": 512, "ffn_size": 2048, "num_heads": 8,
                         "decoder_num_layers": 2, "decoder_hidden_size": 256, "decoder_ffn_size": 1024,
                         "decoder_num_heads": 4, "max_positions": 128, "pre_ln": True},
                  vocab_size=16000, corpus_bytes=30_000_000, seq_len=128, batch=256, budget_steps=2000, lr=1e-3,
                  warmup=0.06, ranks=1, deepspeed_config="zero2_bf16_autocast.json", evals=10, eval_iters=20,
                  finetune_lr=5e-5, finetune_batch=32, finetune_epochs=2, finetune_seeds=3,
                  finetune_max_train=0, finetune_max_length=128, device="cuda"),
}


class CompareError(PipelineError):
    """A stage of the comparison failed; one line naming the stage and where its log is."""


# ------------------------------------------------------------------------------------------------ data

def read_labeled(directory: Path) -> list[tuple[float, str]]:
    """(score, text) of every ``*_GroundTruth.txt`` line in ``directory`` (files in name order)."""
    files = sorted(directory.glob("*_GroundTruth.txt"))
    if not files:
        raise DataError(f"{directory}: no *_GroundTruth.txt files (id<TAB>score<TAB>text)")
    examples = []
    for path in files:
        for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            if not line.strip():
                continue
            parts = line.split("\t", 2)
            try:
                score = float(parts[1])
            except (IndexError, ValueError):
                raise DataError(f"{path}:{number}: expected id<TAB>score<TAB>text") from None
            text = parts[2].strip() if len(parts) == 3 else ""
            if text and math.isfinite(score):
                examples.append((score, text))
    return examples


def write_tasks(labeled_dir: Path, out: Path, seed: int = 0, dev_fraction: float = 0.2) -> dict:
    """The two fine-tuning tasks as JSONL (``text``, ``label``) train/dev files, split once by ``seed``:
    ``sentiment-sign`` (label 1 if score > 0, |score| >= 1 only) and ``sentiment-score`` (the score)."""
    examples = read_labeled(labeled_dir)
    random.Random(seed).shuffle(examples)
    n_dev = max(1, int(len(examples) * dev_fraction))
    splits = {"dev": examples[:n_dev], "train": examples[n_dev:]}
    tasks = {name: dict(options) for name, options in TASKS.items()}
    out.mkdir(parents=True, exist_ok=True)
    for name, task in tasks.items():
        for split, rows in splits.items():
            if task["regression"]:
                records = [{"text": text, "label": score} for score, text in rows]
            else:
                records = [{"text": text, "label": int(score > 0)} for score, text in rows
                           if abs(score) >= MIN_SIGN_SCORE]
            path = out / f"{name}_{split}.jsonl"
            text = "".join(json.dumps(r) + "\n" for r in records)
            # Atomic, and left alone when unchanged: a second invocation (--models) may run beside a first one
            # whose fine-tuning reads these files.
            if not path.is_file() or path.read_text(encoding="utf-8") != text:
                write_text_atomic(path, text)
            task[split] = str(path)
            task[f"{split}_examples"] = len(records)
    return tasks


def write_pretraining_text(corpus: Sequence[Path], out: Path, max_chars: int) -> dict:
    """One paragraph per line from the corpus files (.xz or plain), the same number of characters from each."""
    per_file = max_chars // len(corpus)
    stats = {}
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", encoding="utf-8") as sink:
        for path in corpus:
            opener = lzma.open if path.suffix == ".xz" else open
            taken = 0
            try:
                with opener(path, "rt", encoding="utf-8", errors="replace") as source:
                    for line in source:
                        line = " ".join(line.split())
                        if len(line) < 20:  # headings, list markers, blank lines
                            continue
                        sink.write(line + "\n")
                        taken += len(line) + 1
                        if taken >= per_file:
                            break
            except (OSError, lzma.LZMAError) as error:
                raise DataError(f"{path}: cannot read ({error})") from None
            stats[path.name] = taken
    return stats


# ------------------------------------------------------------------------------------------------ stages

def child_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in [str(REPOSITORY), env.get("PYTHONPATH", "")] if p)
    env.setdefault("DS_ACCELERATOR", "cpu" if not _cuda() else "cuda")
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPOSITORY / ".cache" / "torch_extensions"))
    env.setdefault("PYTHONWARNINGS", "ignore")
    return env


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def run_logged(command: list[str], log: Path, stage: str) -> None:
    """Runs ``command`` with its output in ``log``; CompareError naming the stage and log if it fails."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as stream:
        stream.write(" ".join(command) + "\n")
        stream.flush()
        result = subprocess.run(command, stdout=stream, stderr=subprocess.STDOUT, env=child_env(),
                                cwd=str(REPOSITORY))
    if result.returncode != 0:
        tail = log.read_text(errors="replace").strip().splitlines()[-1:] or [""]
        raise CompareError(f"{stage} failed (exit {result.returncode}; log {log}): {tail[0][:200]}")


def model_config(preset: Preset, architecture: str, vocab_size: int) -> ModelConfig:
    """The ModelConfig run_pretrain.py builds from ``--model-preset tiny`` and the preset's ``--model-set``s."""
    return ModelConfig.preset("tiny", architecture, **preset.model, vocab_size=vocab_size)


def plan_steps(preset: Preset, vocab_size: int) -> list[dict]:
    """Steps and FLOPs per model: the budget is the MLM-15% run's FLOPs, every run gets as many steps as fit."""
    from pipeline.training.flops import training_flops

    per_step = {name: training_flops(model_config(preset, arch, vocab_size), preset.batch, preset.seq_len, rate)
                for name, arch, rate in MODELS}
    budget = per_step[BUDGET_MODEL] * preset.budget_steps
    plans = []
    for name, arch, rate in MODELS:
        steps = max(1, round(budget / per_step[name]))
        plans.append({"name": name, "architecture": arch, "masking_rate": rate, "steps": steps,
                      "flops_per_step": per_step[name], "flops": steps * per_step[name],
                      "flops_vs_budget": steps * per_step[name] / budget})
    return plans


def slug(name: str) -> str:
    return name.lower().replace("%", "").replace(" ", "")


def finished_step(run_dir: Path) -> int | None:
    latest = run_dir / "checkpoints" / "latest"
    if not latest.is_file():
        return None
    tag = latest.read_text().strip()
    return int(tag.rpartition("_")[2]) if tag.startswith("step_") else None


def pretrain(preset: Preset, plan: dict, prefix: Path, tokenizer: Path, run_dir: Path, seed: int) -> None:
    if finished_step(run_dir) == plan["steps"]:
        print(f"  pre-training: reusing {run_dir} (step {plan['steps']})", flush=True)
        return
    from pipeline.training.distributed import free_port

    shutil.rmtree(run_dir, ignore_errors=True)
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={preset.ranks}",
               "--master_addr=127.0.0.1", f"--master_port={free_port()}", str(REPOSITORY / "run_pretrain.py"),
               "--data-prefix", str(prefix), "--tokenizer", str(tokenizer), "--save", str(run_dir),
               "--architecture", plan["architecture"], "--model-preset", "tiny",
               "--masking-rate", str(plan["masking_rate"]), "--seq-len", str(preset.seq_len),
               "--global-batch-size", str(preset.batch), "--micro-batch-size", str(preset.batch // preset.ranks),
               "--train-steps", str(plan["steps"]), "--lr", str(preset.lr),
               "--warmup-proportion", str(preset.warmup), "--seed", str(seed),
               "--deepspeed_config", preset.deepspeed_config, "--log-interval", str(max(1, plan["steps"] // 20)),
               "--eval-interval", str(max(1, plan["steps"] // preset.evals)), "--eval-iters", str(preset.eval_iters),
               "--save-interval", str(plan["steps"]), "--keep-last", "1", "--num-workers", "0",
               "--no-progress-bar"]
    for key, value in preset.model.items():
        command += ["--model-set", f"{key}={json.dumps(value)}"]
    run_logged(command, run_dir.parent / f"{run_dir.name}.log", f"pre-training {plan['name']}")
    if finished_step(run_dir) != plan["steps"]:
        raise CompareError(f"pre-training {plan['name']}: {run_dir} has no checkpoint at step {plan['steps']}")


def export(run_dir: Path, export_dir: Path) -> None:
    if (export_dir / "export_info.json").is_file() and \
            json.loads((export_dir / "export_info.json").read_text()).get("step") == finished_step(run_dir):
        print(f"  export: reusing {export_dir}", flush=True)
        return
    shutil.rmtree(export_dir, ignore_errors=True)
    run_logged([sys.executable, "-m", "pipeline", "export", str(run_dir), "--output", str(export_dir)],
               export_dir.parent / f"{export_dir.name}.log", f"export of {run_dir}")


def finetune(preset: Preset, export_dir: Path, task_name: str, task: dict, out: Path, name: str) -> dict:
    results = out / "results.json"
    if not results.is_file():
        command = [sys.executable, "-m", "pipeline", "finetune", "--model", str(export_dir),
                   "--output-dir", str(out), "--train-file", task["train"], "--dev-file", task["dev"],
                   "--text-fields", "text", "--label-field", "label", "--metrics", task["metrics"],
                   "--task-name", task_name, "--lr", str(preset.finetune_lr),
                   "--batch-size", str(preset.finetune_batch), "--epochs", str(preset.finetune_epochs),
                   "--seeds", str(preset.finetune_seeds), "--max-length", str(preset.finetune_max_length),
                   "--device", preset.device, "--name", name, "--no-progress", "--resume"]
        if task["regression"]:
            command.append("--regression")
        if preset.finetune_max_train:
            command += ["--max-train-examples", str(preset.finetune_max_train)]
        run_logged(command, out.parent / f"{out.name}.log", f"fine-tuning {name} on {task_name}")
    record = json.loads(results.read_text())["tasks"][task_name]
    seeds = [run["score"] for run in record["selections"]["seed-best"]["runs"]]
    return {"score": record["score"], "seed_scores": seeds, "metrics": record["metrics"],
            "spread": (max(seeds) - min(seeds)) if seeds else None,
            "train_examples": record["train_examples"], "dev_examples": record["dev_examples"]}


def validation_curve(run_dir: Path, flops_per_step: float) -> list[dict]:
    from pipeline.evaluation.report import read_metrics

    _, evals = read_metrics(run_dir)
    return [{"step": r["step"], "flops": r["step"] * flops_per_step, "loss": r["loss"],
             "ppl_masked": r.get("ppl_masked")} for r in evals]


# ------------------------------------------------------------------------------------------------ report

def markdown(result: dict) -> str:
    tasks = list(result["tasks"])
    lines = [f"Preset `{result['preset']}`, {result['date']}: pre-training FLOPs {result['budget_flops']:.3g} "
             f"per model (paper Appendix D), fine-tuning median (min-max) over {result['finetune_seeds']} seeds; "
             f"unigram perplexity {result['unigram_perplexity']:.0f}.", "",
             "| model | steps | pre-train FLOPs | masked ppl (at step) | " + " | ".join(tasks) + " |",
             "|---|---:|---:|---:|" + "---:|" * len(tasks)]
    for run in result["runs"]:
        cells = []
        for task in tasks:
            score = run["finetune"][task]
            seeds = score["seed_scores"]
            cells.append(f"{score['score']:.1f} ({min(seeds):.1f}-{max(seeds):.1f})" if seeds else "-")
        curve = run["curve"]
        masked = f"{curve[-1]['ppl_masked']:.0f} ({curve[-1]['step']})" if curve and curve[-1]["ppl_masked"] else "-"
        lines.append(f"| {run['name']} | {run['steps']} | {run['flops']:.3g} | {masked} | " + " | ".join(cells)
                     + " |")
    return "\n".join(lines) + "\n"


def plot(result: dict, output: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only
    import matplotlib.pyplot as plt

    tasks = list(result["tasks"])
    fig, axes = plt.subplots(1, len(tasks) + 1, figsize=(5.2 * (len(tasks) + 1), 4.4))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for index, run in enumerate(result["runs"]):
        color = colors[index % len(colors)]
        for ax, task in zip(axes, tasks):
            score = run["finetune"][task]
            if not score["seed_scores"]:  # not fine-tuned yet (a --report-only table)
                continue
            ax.scatter([run["flops"]] * len(score["seed_scores"]), score["seed_scores"], color=color, alpha=0.4, s=18)
            ax.scatter([run["flops"]], [score["score"]], color=color, marker="D", s=50, label=run["name"])
        curve = [p for p in run["curve"] if p["ppl_masked"] is not None]
        axes[-1].plot([p["flops"] for p in curve], [p["ppl_masked"] for p in curve], "o-", color=color,
                      label=run["name"])
    for ax, task in zip(axes, tasks):
        metric = "accuracy (%)" if not result["tasks"][task]["regression"] else "(Pearson+Spearman)/2 (%)"
        ax.set(xlabel="pre-training FLOPs", ylabel=f"dev {metric}", title=f"{task}: dots = seeds, diamond = median",
               xlim=(0, 1.15 * max(run["flops"] for run in result["runs"])))  # equal budgets: one column
    axes[-1].axhline(result["unigram_perplexity"], color="black", ls="--", lw=1.2, label="unigram")
    axes[-1].set(xlabel="pre-training FLOPs", ylabel="validation perplexity of <mask> tokens", yscale="log",
                 title="pre-training validation curves")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"MLM vs 3ML at equal pre-training FLOPs (preset {result['preset']}, {result['date']})")
    fig.tight_layout()
    fig.savefig(output, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------ main

def compare(preset_name: str, corpus: Sequence[Path], labeled_dir: Path, work: Path, results_dir: Path,
            seed: int = 1234, models: Sequence[str] | None = None, report_only: bool = False) -> dict:
    """Runs the comparison (every stage whose outputs are not complete) and writes the table and plot. With
    ``report_only``, nothing new is trained or fine-tuned: the table holds what is finished (a partial result)."""
    from pipeline.data.preprocess import PreprocessConfig, preprocess
    from pipeline.data.tokenizer import TrainConfig, train_tokenizer
    from pipeline.evaluation.report import unigram_perplexity

    preset = PRESETS[preset_name]
    started, load_start = time.time(), os.getloadavg()
    work.mkdir(parents=True, exist_ok=True)
    settings = json.loads(json.dumps({"preset": dataclasses.asdict(preset), "corpus": [str(p) for p in corpus],
                                      "seed": seed}))  # as it reads back from settings.json
    settings_file = work / "settings.json"
    if settings_file.is_file() and json.loads(settings_file.read_text()) != settings:
        raise CompareError(f"{work}: holds a comparison with other settings ({settings_file}); use another "
                           "--work-dir or delete it")
    write_text_atomic(settings_file, json.dumps(settings, indent=1))

    print(f"== data ({preset_name})", flush=True)
    prefix, tokenizer = work / "data" / "corpus", work / "tokenizer" / "tokenizer.json"
    if not Path(f"{prefix}.meta.json").is_file():
        text = work / "data" / "corpus.txt"
        chars = write_pretraining_text(corpus, text, preset.corpus_bytes)
        print(f"pre-training text: {sum(chars.values()) / 1e6:.1f}M characters {chars}", flush=True)
        train_tokenizer([text], tokenizer, TrainConfig(vocab_size=preset.vocab_size, min_frequency=2))
        preprocess(PreprocessConfig(inputs=[text], tokenizer=tokenizer, output_prefix=prefix, one_doc_per_line=True,
                                    valid_fraction=0.02, seed=seed, workers=1, show_progress=False))
    meta = json.loads(Path(f"{prefix}.meta.json").read_text())
    vocab_size = meta["tokenizer"]["vocab_size"]
    unigram = unigram_perplexity(prefix)
    tasks = {name: task for name, task in write_tasks(labeled_dir, work / "tasks").items() if name in preset.tasks}
    print(f"tokens: train {meta['splits']['train']['tokens']:,}, valid {meta['splits']['valid']['tokens']:,}; "
          f"unigram perplexity {unigram:.1f}; tasks " + ", ".join(
              f"{name} {t['train_examples']}/{t['dev_examples']}" for name, t in tasks.items()), flush=True)

    plans = plan_steps(preset, vocab_size)
    if models:
        unknown = set(models) - {name for name, _, _ in MODELS}
        if unknown:
            raise ConfigError(f"unknown models {sorted(unknown)} (known: {[name for name, _, _ in MODELS]})")
        plans = [p for p in plans if p["name"] in models]
    for plan in plans:
        print(f"{plan['name']:<13} {plan['steps']:>6} steps x {plan['flops_per_step']:.3g} FLOPs = "
              f"{plan['flops']:.4g} ({plan['flops_vs_budget']:.4f} x budget)", flush=True)

    runs = []
    for plan in plans:
        name, key = plan["name"], slug(plan["name"])
        print(f"\n== {name}", flush=True)
        t = time.time()
        run_dir, export_dir = work / "runs" / key, work / "exports" / key
        if report_only and finished_step(run_dir) != plan["steps"]:
            print("  not pre-trained yet (--report-only): left out", flush=True)
            continue
        pretrain(preset, plan, prefix, tokenizer, run_dir, seed)
        # The FLOPs of the model as it was trained (its resolved config), not as planned.
        from pipeline.training.flops import training_flops

        trained = json.loads((run_dir / "config.json").read_text())
        trained_flops = plan["steps"] * training_flops(ModelConfig.from_dict(trained["model"]), preset.batch,
                                                       preset.seq_len, trained["masking"]["rate"])
        pretrain_s = time.time() - t
        export(run_dir, export_dir)
        scores = {}
        for task_name, task in tasks.items():
            out = work / "finetune" / key / task_name
            if report_only and not (out / "results.json").is_file():
                print(f"  {task_name}: not fine-tuned yet (--report-only)", flush=True)
                scores[task_name] = {"score": None, "seed_scores": [], "metrics": {}, "spread": None}
                continue
            scores[task_name] = finetune(preset, export_dir, task_name, task, out, name)
        runs.append({**plan, "flops": trained_flops, "curve": validation_curve(run_dir, plan["flops_per_step"]),
                     "finetune": scores, "pretrain_seconds": round(pretrain_s, 1),
                     "seconds": round(time.time() - t, 1)})
        print(f"{name}: " + "; ".join(f"{task} {s['score']:.1f} (seeds {', '.join(f'{x:.1f}' for x in s['seed_scores'])})"
                                     for task, s in scores.items() if s["seed_scores"]) + f"; {time.time() - t:.0f} s",
              flush=True)

    if not runs:
        raise CompareError(f"{work}: no model is pre-trained yet (--report-only)")
    budget = runs[0]["flops"] if runs and runs[0]["name"] == BUDGET_MODEL else plans[0]["flops"]
    result = {
        "preset": preset_name, "date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv),
        "settings": settings, "budget_flops": budget, "unigram_perplexity": unigram,
        "finetune_seeds": preset.finetune_seeds,
        "tasks": {name: {k: v for k, v in t.items() if k not in ("train", "dev")} for name, t in tasks.items()},
        "runs": runs, "flops_max_deviation": max(abs(r["flops"] / budget - 1) for r in runs),
        "seconds": round(time.time() - started, 1), "load_average_start": load_start,
        "load_average_end": os.getloadavg(),
    }
    results_dir.mkdir(parents=True, exist_ok=True)
    stem = results_dir / f"compare_{preset_name}"
    write_text_atomic(f"{stem}.json", json.dumps(result, indent=1) + "\n")
    write_text_atomic(f"{stem}.md", markdown(result))
    plot(result, Path(f"{stem}.png"))
    print("\n" + markdown(result))
    print(f"FLOPs agree within {100 * result['flops_max_deviation']:.2f}%; {result['seconds']:.0f} s; "
          f"load average {load_start[0]:.1f} -> {result['load_average_end'][0]:.1f}")
    print(f"wrote {stem}.json, {stem}.md, {stem}.png")
    if result["flops_max_deviation"] > FLOPS_TOLERANCE:
        raise CompareError(f"the runs' FLOPs differ by {100 * result['flops_max_deviation']:.1f}% "
                           f"(> {100 * FLOPS_TOLERANCE:.0f}%)")
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--corpus", nargs="+", type=Path,
                        help="pre-training text files (.txt or .txt.xz, one paragraph per line) [default: the prose "
                             f"files of ../shared/corpus: {', '.join(PROSE_FILES)}]")
    parser.add_argument("--labeled-dir", type=Path, default=REPOSITORY.parent / "shared" / "labeled",
                        help="directory of *_GroundTruth.txt files [default: ../shared/labeled]")
    parser.add_argument("--work-dir", type=Path, help="[default: compare_out/PRESET]")
    parser.add_argument("--results-dir", type=Path, default=REPOSITORY / "bench" / "results")
    # argparse formats help strings with %: the model names' percent signs are escaped.
    parser.add_argument("--models", help="comma-separated subset of "
                        + ", ".join(name.replace("%", "%%") for name, _, _ in MODELS))
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--report-only", action="store_true",
                        help="train and fine-tune nothing new: write the table and plot of what is finished")
    args = parser.parse_args(argv)
    corpus = args.corpus or [REPOSITORY.parent / "shared" / "corpus" / name for name in PROSE_FILES]
    for path in corpus:
        if not path.is_file():
            parser.error(f"{path}: corpus file not found (pass --corpus)")
    if not args.labeled_dir.is_dir():
        parser.error(f"{args.labeled_dir}: labeled-data directory not found (pass --labeled-dir)")
    work = args.work_dir or REPOSITORY / "compare_out" / args.preset
    models = [m.strip() for m in args.models.split(",")] if args.models else None
    compare(args.preset, corpus, args.labeled_dir, work, args.results_dir, args.seed, models, args.report_only)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
