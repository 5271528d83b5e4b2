"""Shared fixtures: a real English text (gensim's Lee corpus), a tiny tokenizer trained on it and a tiny
preprocessed dataset (session-scoped: built once, in a few seconds, and reused by every test module), and a runner
for the bench/ experiment scripts."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def english_text_file() -> Path:
    """gensim's ``lee_background.cor``: 300 English news documents, one per line (read in place, not copied)."""
    import gensim

    path = Path(gensim.__file__).parent / "test" / "test_data" / "lee_background.cor"
    assert path.is_file(), f"gensim test data missing: {path}"
    return path


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory, english_text_file) -> Path:
    """Path of a tokenizer.json: byte-level BPE with RoBERTa specials (ids 0..4), vocab 1000, trained on the Lee
    corpus."""
    from pipeline.data.tokenizer import TrainConfig, train_tokenizer

    directory = tmp_path_factory.mktemp("tiny_tokenizer")
    return train_tokenizer([english_text_file], directory / "tokenizer.json",
                           TrainConfig(vocab_size=1000, min_frequency=2))


@pytest.fixture(scope="session")
def tiny_dataset_prefix(tmp_path_factory, english_text_file, tiny_tokenizer) -> str:
    """Prefix P of the Lee corpus preprocessed with ``tiny_tokenizer``: ``P_train.{bin,idx}`` (281 documents),
    ``P_valid.{bin,idx}`` (19 documents) and ``P.meta.json``."""
    from pipeline.data.preprocess import PreprocessConfig, preprocess

    prefix = tmp_path_factory.mktemp("tiny_dataset") / "lee"
    preprocess(PreprocessConfig(inputs=[english_text_file], tokenizer=tiny_tokenizer, output_prefix=prefix,
                                one_doc_per_line=True, valid_fraction=0.05, seed=1234, workers=1,
                                show_progress=False))
    return str(prefix)


# One process, TP=1, for in-process model tests; torn down so multi-process tests that follow start clean.
@pytest.fixture(scope="module")
def single_process_group():
    import torch.distributed as dist
    from megatron.core import parallel_state

    from model.parallel import initialize_single_process

    owns_group = not dist.is_initialized()
    initialize_single_process(seed=5)
    yield
    parallel_state.destroy_model_parallel()
    if owns_group:
        dist.destroy_process_group()


@pytest.fixture
def run_bench_script(tmp_path):
    """``run(script, *options) -> dict``: runs ``bench/<script>.py`` with ``options`` and ``--json`` in a child
    process on the CPU and returns the JSON it wrote (asserting it exited 0)."""
    import json
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent

    def run(script: str, *options: str) -> dict:
        out = tmp_path / f"{script}.json"
        env = {**os.environ, "PYTHONPATH": str(root), "DS_ACCELERATOR": "cpu"}
        proc = subprocess.run([sys.executable, str(root / "bench" / f"{script}.py"), *options, "--json", str(out)],
                              cwd=root, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return json.loads(out.read_text())

    return run
