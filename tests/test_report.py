"""pipeline.evaluation.report draws the loss/perplexity PNG from a run's metrics.jsonl."""

from __future__ import annotations

import json

import pytest

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


def test_unigram_perplexity_is_train_frequencies_on_valid_corruptible_tokens(tiny_dataset_prefix):
    import math
    from collections import Counter

    from pipeline.data.meta import import_indexed_dataset_module, load_meta

    meta = load_meta(tiny_dataset_prefix)
    vocab, special = meta["tokenizer"]["vocab_size"], meta["special_tokens"]
    never_corrupted = {special["bos"], special["eos"], special["pad"], special["mask"]}
    indexed = import_indexed_dataset_module().IndexedDataset

    def counts(split):  # document by document, not through report's single read of the .bin
        data = indexed(f"{tiny_dataset_prefix}_{split}")
        return Counter(int(t) for i in range(len(data)) for t in data[i] if int(t) not in never_corrupted)

    train, valid = counts("train"), counts("valid")
    total = sum(train.values()) + vocab - len(never_corrupted)
    expected = math.exp(-sum(n * math.log((train[t] + 1) / total) for t, n in valid.items()) / sum(valid.values()))
    value = report.unigram_perplexity(tiny_dataset_prefix)
    assert value == pytest.approx(expected, rel=1e-9)
    assert 50 < value < vocab  # frequencies beat the uniform guess


def test_report_draws_unigram_line_and_ratio(tmp_path, capsys, tiny_dataset_prefix):
    run_dir = tmp_path / "run"
    write_metrics(run_dir)
    (run_dir / "config.json").write_text(json.dumps({"data": {"prefix": tiny_dataset_prefix}}))
    unigram = report.unigram_perplexity(tiny_dataset_prefix)
    assert report.main([str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert f"masked-token perplexity 45.0 = {45.0 / unigram:.2f} x the unigram {unigram:,.1f}" in out
    (run_dir / "config.json").write_text(json.dumps({"data": {"prefix": str(tmp_path / "gone")}}))
    assert report.main([str(run_dir)]) == 0  # the dataset moved away: curves without the line
    assert "x the unigram" not in capsys.readouterr().out
    assert report.main([str(run_dir), "--data-prefix", str(tmp_path / "gone")]) == 1
    assert "gone.meta.json" in capsys.readouterr().err


def test_report_on_a_blend_draws_the_blends_unigram_level(tmp_path, capsys, tiny_dataset_prefix, tiny_tokenizer,
                                                          english_text_file):
    import math
    from collections import Counter

    from pipeline.data.meta import import_indexed_dataset_module, load_meta
    from pipeline.data.preprocess import PreprocessConfig, preprocess

    half_text = tmp_path / "half.txt"  # a second source: the first 100 Lee documents
    half_text.write_text("\n".join(english_text_file.read_text(encoding="utf-8").splitlines()[:100]) + "\n")
    half = str(tmp_path / "data" / "half")
    preprocess(PreprocessConfig(inputs=[half_text], tokenizer=tiny_tokenizer, output_prefix=half,
                                one_doc_per_line=True, valid_fraction=0.2, workers=1, show_progress=False))
    meta = load_meta(tiny_dataset_prefix)
    vocab, special = meta["tokenizer"]["vocab_size"], meta["special_tokens"]
    never_corrupted = {special["bos"], special["eos"], special["pad"], special["mask"]}

    def counts(prefix, split):  # document by document, not through report's single read of the .bin
        data = import_indexed_dataset_module().IndexedDataset(f"{prefix}_{split}")
        return Counter(int(t) for i in range(len(data)) for t in data[i] if int(t) not in never_corrupted)

    weights = {tiny_dataset_prefix: 0.7, half: 0.3}
    smoothed = {prefix: (lambda train: lambda t: (train[t] + 1) / (sum(train.values()) + vocab - 4))(
        counts(prefix, "train")) for prefix in weights}
    mixture = lambda t: sum(weight * smoothed[prefix](t) for prefix, weight in weights.items())  # noqa: E731
    cross_entropy = {}
    for prefix in weights:
        valid = counts(prefix, "valid")
        cross_entropy[prefix] = -sum(n * math.log(mixture(t)) for t, n in valid.items()) / sum(valid.values())
    expected = math.exp(sum(weight * cross_entropy[prefix] for prefix, weight in weights.items()))
    assert report.unigram_perplexity(f"0.7 {tiny_dataset_prefix} 0.3 {half}") == pytest.approx(expected, rel=1e-9)
    # Unnormalised weights as on the command line; not a single source's level.
    assert report.unigram_perplexity(["7", tiny_dataset_prefix, "3", half]) == pytest.approx(expected, rel=1e-9)
    assert expected != pytest.approx(report.unigram_perplexity(tiny_dataset_prefix), rel=1e-3)

    run_dir = tmp_path / "run"
    write_metrics(run_dir)
    # How the trainer stores a blend in config.json: one space-separated string.
    (run_dir / "config.json").write_text(json.dumps({"data": {"prefix": f"0.7 {tiny_dataset_prefix} 0.3 {half}"}}))
    assert report.main([str(run_dir)]) == 0
    assert f"masked-token perplexity 45.0 = {45.0 / expected:.2f} x the unigram {expected:,.1f}" in \
        capsys.readouterr().out
    assert report.main([str(run_dir), "--data-prefix", "0.7", tiny_dataset_prefix, "0.3", half]) == 0
    assert f"x the unigram {expected:,.1f}" in capsys.readouterr().out
    # A source moved away: the curves without the line, and one line saying why.
    (run_dir / "config.json").write_text(json.dumps({"data": {"prefix": f"0.7 {tiny_dataset_prefix} 0.3 "
                                                                        f"{tmp_path / 'gone'}"}}))
    assert report.main([str(run_dir)]) == 0
    captured = capsys.readouterr()
    assert "x the unigram" not in captured.out
    assert captured.err == f"note: no unigram line: {tmp_path / 'gone'}.meta.json not found (the run's data " \
                           "moved?); give --data-prefix\n"
