"""The pipeline's one front door: ``python -m pipeline <command> [options]``; ``<command> --help`` for each."""

from __future__ import annotations

import importlib
import sys

from pipeline.errors import run_cli

# command -> (module with a ``main(argv)``, one-line summary). Modules are imported only when their command runs.
COMMANDS = {
    "tokenizer": ("pipeline.data.tokenizer", "train a byte-level BPE tokenizer or import GPT-2/RoBERTa files"),
    "preprocess": ("pipeline.data.preprocess", "tokenize a corpus into megatron-core indexed datasets"),
    "merge": ("pipeline.data.merge", "join preprocessed shards (preprocess --shard I/N) into one dataset"),
    "train": ("pipeline.training.trainer", "pre-train (the same as run_pretrain.py; launch with torchrun etc.)"),
    "reshard": ("pipeline.training.universal", "re-shard a checkpoint for another number of data-parallel ranks"),
    "flops": ("pipeline.training.flops", "training FLOPs of MLM / 3ML (paper Appendix D) and the speedup"),
    "params": ("model.params", "parameter counts of the model presets"),
    "export": ("pipeline.evaluation.export", "export a checkpoint to a Hugging Face model"),
    "finetune": ("pipeline.evaluation.finetune", "fine-tune an exported encoder on GLUE or custom tasks"),
    "report": ("pipeline.evaluation.report", "loss and perplexity curves of a run"),
    "demo": ("pipeline.demo", "the end-to-end demo on a small embedded corpus (what `make demo` runs)"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: python -m pipeline <command> [options]   (python -m pipeline <command> --help)", "",
             "commands:"]
    lines += [f"  {name:<{width}}  {summary}" for name, (_, summary) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"error: unknown command {command!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[command][0])
    # argparse names the program after argv[0]: say how it was invoked (run_pretrain.py's parser is shared by train).
    sys.argv[0] = f"python -m pipeline {command}"
    return run_cli(lambda: module.main(rest))


if __name__ == "__main__":
    sys.exit(main())
