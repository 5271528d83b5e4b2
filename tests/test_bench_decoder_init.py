"""bench/decoder_init.py (the 3ML decoder-embedding-init experiment, README) runs on the test corpus with either
init, and in 30 steps masked-token perplexity falls to under half of its start."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("init", ["content", "bert"])
def test_decoder_init_experiment_learns(tmp_path, tiny_dataset_prefix, init):
    out = tmp_path / f"{init}.json"
    cmd = [sys.executable, str(ROOT / "bench" / "decoder_init.py"), "--data-prefix", str(tiny_dataset_prefix),
           "--init", init, "--steps", "30", "--batch", "8", "--seq-len", "64", "--eval-interval", "30",
           "--eval-batches", "4", "--json", str(out)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DS_ACCELERATOR": "cpu"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    first, last = result["records"][0], result["records"][-1]
    assert (first["step"], last["step"]) == (0, 30)
    assert last["ppl_masked"] < 0.5 * first["ppl_masked"], result["records"]
    assert 1.0 < result["unigram_perplexity"] < first["ppl_masked"]  # an untrained model is worse than unigram
