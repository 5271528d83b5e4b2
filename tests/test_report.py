"""pipeline.evaluation.report draws the loss/perplexity PNG from a run's metrics.jsonl."""

from __future__ import annotations

import json

from pipeline.evaluation import report


def write_metrics(run_dir, steps=20):
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "metrics.jsonl", "w") as out:
        for step in range(1, steps + 1):
            out.write(json.dumps({"kind": "train", "step": step, "loss": 7.0 - 0.1 * step, "lr": 1e-3}) + "\n")
            if step % 5 == 0:
                out.write(json.dumps({"kind": "eval", "step": step, "loss": 7.1 - 0.1 * step,
                                      "ppl_masked": 900.0 / step, "ppl_replaced": 800.0 / step,
                                      "ppl_unchanged": None}) + "\n")
        out.write('{"kind": "train", "step": 21, "lo')  # a line cut by a crash


def test_report_writes_png_and_summary(tmp_path, capsys):
    run_dir = tmp_path / "run"
    write_metrics(run_dir)
    assert report.main([str(run_dir)]) == 0
    png = run_dir / "loss_curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    out = capsys.readouterr().out
    assert "train loss 6.900 (step 1) -> 5.000 (step 20)" in out and "validation loss" in out
    custom = tmp_path / "elsewhere" / "curves.png"
    assert report.main([str(run_dir), "--output", str(custom)]) == 0 and custom.is_file()


def test_report_missing_metrics_is_a_one_line_error(tmp_path, capsys):
    assert report.main([str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "metrics.jsonl: not found" in err and err.count("\n") == 1
