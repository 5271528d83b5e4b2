"""bench/throughput.py on CPU with the tiny preset: the table's numbers are consistent with each other and with
pipeline.training.flops (the GPU figures in the README come from the same script)."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

from model.config import ModelConfig
from pipeline.training.flops import speedup, training_flops

ROOT = Path(__file__).resolve().parent.parent


def test_throughput_bench_rows_are_consistent(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, "-m", "bench.throughput", "--presets", "tiny", "--runs", "mlm:0.15,3ml-self:0.5",
           "--precisions", "fp32", "--seq-len", "64", "--batch", "4", "--steps", "2", "--warmup", "1",
           "--loader-batches", "2", "--loader-workers", "0", "--vocab-size", "1000", "--json", str(out)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DS_ACCELERATOR": "cpu", "MASTER_ADDR": "127.0.0.1"}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"):
        env.pop(name, None)
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "| tiny | 3ml-self | 0.50 | fp32 | 4 x 64 (40) |" in proc.stdout
    result = json.loads(out.read_text())
    mlm, self3ml = result["rows"]
    peak = result["environment"]["peak_tflops"]["fp32"]
    for row in (mlm, self3ml):
        config = ModelConfig.preset("tiny", row["architecture"], vocab_size=1000)
        flops = training_flops(config, 4, 64, row["masking_rate"], fwd_bwd_factor=3.0)
        assert math.isclose(row["tflops"], flops / (row["ms_per_step"] / 1000) / 1e12, rel_tol=1e-6)
        assert math.isclose(row["mfu"], row["tflops"] / peak, rel_tol=1e-6)
        assert math.isclose(row["samples_per_s"], 4 / (row["ms_per_step"] / 1000), rel_tol=1e-6)
        # a freshly initialised model predicts ~uniformly over the 1000-token vocabulary
        assert abs(row["final_loss"] - math.log(1000)) < 1.0
        assert row["loader_ms_per_batch"] > 0
    assert self3ml["encoder_len"] == 40  # 64 tokens - 26 <mask> (0.8 x 32) = 38 kept, padded to 40
    assert math.isclose(self3ml["measured_speedup"], mlm["ms_per_step"] / self3ml["ms_per_step"], rel_tol=1e-6)
    expected = speedup(ModelConfig.preset("tiny", "3ml-self", vocab_size=1000), 0.5,
                       ModelConfig.preset("tiny", "mlm", vocab_size=1000), 0.15, 64)
    assert math.isclose(self3ml["predicted_speedup"], expected, rel_tol=1e-9)
