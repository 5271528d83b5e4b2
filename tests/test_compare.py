"""bench/compare.py: the equal-compute MLM/3ML comparison (tiny preset end to end, plus its data and FLOPs plan)."""

from __future__ import annotations

import importlib.util
import json
import random
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load_compare():
    spec = importlib.util.spec_from_file_location("bench_compare", ROOT / "bench" / "compare.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


compare = _load_compare()


@pytest.fixture(scope="module")
def labeled_dir(tmp_path_factory, english_text_file):
    """Two ``*_GroundTruth.txt`` files in the VADER format (id, score, text) made of Lee-corpus sentences with
    seeded scores in -4..+4 (the shared VADER data is not in a user's clone)."""
    directory = tmp_path_factory.mktemp("labeled")
    sentences = list(dict.fromkeys(s.strip() for line in english_text_file.read_text(errors="replace").splitlines()
                                   for s in line.split(". ") if len(s.strip()) > 30))  # unique texts
    rng = random.Random(0)
    half = len(sentences) // 2
    for name, part in (("news", sentences[:half]), ("more", sentences[half:])):
        lines = [f"{i}\t{rng.uniform(-4, 4):.3f}\t{text}" for i, text in enumerate(part[:200], 1)]
        (directory / f"{name}_GroundTruth.txt").write_text("\n".join(lines) + "\n")
    return directory


def test_tasks_are_sign_and_score(tmp_path, labeled_dir):
    tasks = compare.write_tasks(labeled_dir, tmp_path)
    examples = compare.read_labeled(labeled_dir)
    assert len(examples) == 400
    sign = [json.loads(line) for split in ("train", "dev")
            for line in Path(tasks["sentiment-sign"][split]).read_text().splitlines()]
    score = [json.loads(line) for split in ("train", "dev")
             for line in Path(tasks["sentiment-score"][split]).read_text().splitlines()]
    assert len(score) == 400 and tasks["sentiment-score"]["dev_examples"] == 80
    # Only |score| >= 1 enters the sign task, labelled by the sign.
    by_text = {text: value for value, text in examples}
    assert len(sign) == sum(abs(value) >= 1 for value, _ in examples) < 400
    assert all(record["label"] == int(by_text[record["text"]] > 0) for record in sign)
    assert {record["label"] for record in sign} == {0, 1}
    assert all(record["label"] == by_text[record["text"]] for record in score)


def test_bad_labeled_line_is_one_line_error(tmp_path):
    (tmp_path / "x_GroundTruth.txt").write_text("1\t0.5\tfine\n2\tnot-a-number\ttext\n")
    with pytest.raises(compare.DataError, match=r"x_GroundTruth.txt:2: expected id<TAB>score<TAB>text"):
        compare.read_labeled(tmp_path)


def test_plan_gives_every_model_the_same_flops():
    for name in compare.PRESETS:
        preset = compare.PRESETS[name]
        plans = {p["name"]: p for p in compare.plan_steps(preset, preset.vocab_size)}
        assert all(abs(p["flops_vs_budget"] - 1) < compare.FLOPS_TOLERANCE for p in plans.values()), name
        # 3ML's encoder skips the <mask> tokens: more steps for the same FLOPs; MLM at 50% predicts more tokens.
        assert plans["3MLself-50%"]["steps"] > plans["MLM-15%"]["steps"] > plans["MLM-50%"]["steps"]
        assert plans["MLM-15%"]["steps"] == preset.budget_steps


def test_tiny_preset_pretrains_exports_and_finetunes_every_model(tmp_path, english_text_file, labeled_dir):
    results = tmp_path / "results"
    result = compare.compare("tiny", [english_text_file], labeled_dir, tmp_path / "work", results)
    names = [run["name"] for run in result["runs"]]
    assert names == [name for name, _, _ in compare.MODELS]
    assert result["flops_max_deviation"] < compare.FLOPS_TOLERANCE
    assert result["unigram_perplexity"] > 50
    for run in result["runs"]:
        key = compare.slug(run["name"])
        assert (tmp_path / "work" / "exports" / key / "model.safetensors").is_file()
        interval = run["steps"] // compare.PRESETS["tiny"].evals  # the trainer validates at its multiples
        assert run["curve"][0]["step"] == 0 and run["steps"] - interval < run["curve"][-1]["step"] <= run["steps"]
        # Pre-training moved the masked-token perplexity away from the uniform distribution's.
        assert run["curve"][-1]["ppl_masked"] < 0.5 * run["curve"][0]["ppl_masked"]
        assert list(run["finetune"]) == ["sentiment-sign"]  # the tiny preset's one task
        sign = run["finetune"]["sentiment-sign"]
        assert len(sign["seed_scores"]) == compare.PRESETS["tiny"].finetune_seeds
        dev = (tmp_path / "work" / "tasks" / "sentiment-sign_dev.jsonl").read_text().splitlines()
        assert all(0 <= s <= 100 for s in sign["seed_scores"]) and sign["dev_examples"] == {"": len(dev)}
    saved = json.loads((results / "compare_tiny.json").read_text())
    assert saved["runs"][1]["steps"] == result["runs"][1]["steps"]
    assert (results / "compare_tiny.png").read_bytes()[:4] == b"\x89PNG"
    assert "| 3MLself-50% |" in (results / "compare_tiny.md").read_text()
    # A second invocation reuses every finished stage.
    again = compare.compare("tiny", [english_text_file], labeled_dir, tmp_path / "work", results)
    assert again["seconds"] < result["seconds"] / 3
    assert [r["finetune"] for r in again["runs"]] == [r["finetune"] for r in result["runs"]]
