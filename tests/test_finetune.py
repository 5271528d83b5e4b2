"""Fine-tuning: median-of-seeds aggregation, the paper's grid, RoBERTa input format, a tiny exported model that
learns a cue-word task (beats the majority baseline), the GLUE path with MNLI initialisation on a pre-LN model,
and clear CLI errors."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from pipeline.evaluation import finetune, glue
from pipeline.evaluation.finetune import FinetuneConfig, GridPoint, RunOutcome

CUE = "zebra"


def _lee_lines() -> list[str]:
    import gensim

    path = Path(gensim.__file__).parent / "test" / "test_data" / "lee_background.cor"
    return path.read_text(encoding="utf-8").splitlines()


def _export_dir(directory: Path, pre_layer_norm: bool) -> Path:
    """What pipeline.evaluation.export writes: a tiny model (roberta or roberta-prelayernorm) plus a byte-level BPE tokenizer
    with RoBERTa's special tokens, both via save_pretrained."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import (PreTrainedTokenizerFast, RobertaConfig, RobertaForMaskedLM,
                              RobertaPreLayerNormConfig, RobertaPreLayerNormForMaskedLM)

    lines = _lee_lines()
    bpe = ByteLevelBPETokenizer()
    # The cue words are in the tokenizer's training text so that each is a single token.
    bpe.train_from_iterator(lines[:60] + [f"a {CUE} and a tiger"] * 50, vocab_size=400, min_frequency=2,
                            special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"], show_progress=False)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<s>", eos_token="</s>",
                                        pad_token="<pad>", unk_token="<unk>", mask_token="<mask>")
    tokenizer.save_pretrained(directory)
    config_class, model_class = ((RobertaPreLayerNormConfig, RobertaPreLayerNormForMaskedLM) if pre_layer_norm
                                 else (RobertaConfig, RobertaForMaskedLM))
    config = config_class(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                          intermediate_size=64, max_position_embeddings=66, pad_token_id=1, bos_token_id=0,
                          eos_token_id=2, type_vocab_size=1)
    torch.manual_seed(0)
    model_class(config).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def roberta_dir(tmp_path_factory) -> Path:
    return _export_dir(tmp_path_factory.mktemp("roberta_export"), pre_layer_norm=False)


@pytest.fixture(scope="module")
def prelayernorm_dir(tmp_path_factory) -> Path:
    return _export_dir(tmp_path_factory.mktemp("preln_export"), pre_layer_norm=True)


def _cue_rows(count: int, seed: int, positive_fraction: float = 0.4) -> list[dict]:
    """Short news snippets; label 1 iff the cue word was inserted."""
    rng = random.Random(seed)
    words = " ".join(_lee_lines()[100:200]).split()
    rows = []
    for _ in range(count):
        start = rng.randrange(len(words) - 12)
        sentence = words[start : start + rng.randint(6, 12)]
        label = int(rng.random() < positive_fraction)
        if label:
            sentence.insert(rng.randrange(1, len(sentence) + 1), CUE)
        rows.append({"sentence": " ".join(sentence), "label": label})
    return rows


# --------------------------------------------------------------------------------------------- aggregation


def _run(seed: int, score: float, point: GridPoint = GridPoint(1e-5, 16, 3), **metrics) -> RunOutcome:
    return RunOutcome(point, seed, best_epoch=1, score=score, metrics=metrics or {"acc": score})


def test_median_of_runs_odd_and_even():
    score, metrics = finetune.median_of_runs([_run(1, 70.0), _run(2, 90.0), _run(3, 80.0)])
    assert score == 80.0 and metrics == {"acc": 80.0}
    # Even count: mean of the two middle runs, metrics too (so they still average to the score).
    runs = [_run(1, 60.0, f1=70.0, acc=50.0), _run(2, 80.0, f1=90.0, acc=70.0), _run(3, 70.0, f1=75.0, acc=65.0),
            _run(4, 100.0, f1=100.0, acc=100.0)]
    score, metrics = finetune.median_of_runs(runs)
    assert score == 75.0 and metrics == {"f1": 82.5, "acc": 67.5}


def test_selections_differ_as_defined():
    first, second = GridPoint(1e-5, 16, 3), GridPoint(3e-5, 16, 3)
    # Grid point `first` is steady (median 80); `second` is erratic but has each seed's best for 2 of 3 seeds.
    runs = [_run(1, 80.0, first), _run(2, 80.0, first), _run(3, 80.0, first),
            _run(1, 95.0, second), _run(2, 90.0, second), _run(3, 10.0, second)]
    seed_best = finetune.select(runs, "seed-best")
    # Per seed best over the grid: 95, 90, 80 -> median 90.
    assert seed_best.score == 90.0 and seed_best.grid_point is None
    assert sorted(score for _, _, score in seed_best.median_over) == [80.0, 90.0, 95.0]
    grid_median = finetune.select(runs, "grid-median")
    # Per grid point median: first 80, second 90 -> second.
    assert grid_median.score == 90.0 and grid_median.grid_point == second
    steady = [_run(1, 80.0, first), _run(2, 80.0, first), _run(1, 99.0, second), _run(2, 10.0, second)]
    assert finetune.select(steady, "grid-median").grid_point == first  # median 80 vs 54.5
    assert finetune.select(steady, "seed-best").score == pytest.approx((99.0 + 80.0) / 2)
    # A diverged run (nan score) ranks below every finite one instead of poisoning the ordering.
    diverged = [_run(1, float("nan"), second), _run(1, 70.0, first), _run(2, 60.0, first), _run(3, 50.0, first)]
    assert finetune.select(diverged, "seed-best").score == 60.0
    assert finetune.median_of_runs(diverged)[0] == 55.0  # ordered nan, 50, 60, 70: middle two


def test_paper_grid_and_overrides():
    config = FinetuneConfig(model_path="m", output_dir="o")
    large = config.grid_for("MNLI")
    assert {(p.learning_rate, p.batch_size, p.epochs) for p in large} == {
        (5e-5, 32, 3), (5e-5, 32, 5), (8e-5, 32, 3), (8e-5, 32, 5)}
    small = config.grid_for("RTE")
    assert len(small) == 4 * 2 * 3 and {p.epochs for p in small} == {3, 5, 10}
    assert {p.batch_size for p in small} == {16, 32} and {p.learning_rate for p in small} == {1e-5, 3e-5, 5e-5, 8e-5}
    assert config.weight_decay == 0.1 and config.warmup_ratio == 0.06 and config.seed_list() == [1, 2, 3, 4, 5]
    explicit = FinetuneConfig(model_path="m", output_dir="o", learning_rates=(2e-5,), epoch_counts=(2,))
    assert explicit.grid_for("CoLA") == [GridPoint(2e-5, 16, 2), GridPoint(2e-5, 32, 2)]


# ---------------------------------------------------------------------------------------------- features


def test_roberta_inputs_and_truncation(roberta_dir):
    tokenizer = finetune.load_tokenizer(str(roberta_dir))
    examples = glue.Examples(texts=[("the zebra", "a tiger"), ("one " * 40, "two")], labels=[0, 1])
    encoded = finetune.encode_examples(tokenizer, examples, max_length=24)
    first_a = tokenizer("the zebra", add_special_tokens=False)["input_ids"]
    first_b = tokenizer("a tiger", add_special_tokens=False)["input_ids"]
    assert len(first_a) + len(first_b) + 4 <= 24
    assert encoded.input_ids[0] == [0, *first_a, 2, 2, *first_b, 2]
    # Longest-first truncation shortens the long first segment and keeps the short second one whole.
    second_a = tokenizer("one " * 40, add_special_tokens=False)["input_ids"]
    second_b = tokenizer("two", add_special_tokens=False)["input_ids"]
    kept = 24 - 4 - len(second_b)
    assert encoded.input_ids[1] == [0, *second_a[:kept], 2, 2, *second_b, 2]
    single = finetune.encode_examples(tokenizer, glue.Examples([("one " * 40,)], [0]), max_length=12)
    assert single.input_ids[0] == [0, *second_a[:10], 2]
    batch = finetune.collate(encoded, [0, 1], pad_id=tokenizer.pad_token_id, regression=False)
    assert batch["input_ids"].shape == (2, 24) and batch["attention_mask"][0].sum() == len(encoded.input_ids[0])
    assert (batch["input_ids"][0, len(encoded.input_ids[0]) :] == 1).all() and batch["labels"].tolist() == [0, 1]


# ---------------------------------------------------------------------------------------------- training


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def test_tiny_model_beats_majority_baseline(roberta_dir, tmp_path, capsys):
    rows = _cue_rows(400, seed=0)
    train = _write_jsonl(tmp_path / "train.jsonl", rows[:300])
    dev = _write_jsonl(tmp_path / "dev.jsonl", rows[300:])
    majority = 100.0 * max(sum(row["label"] for row in rows[300:]), sum(1 - row["label"] for row in rows[300:])) / 100
    output = tmp_path / "out"
    code = finetune.main([
        "--model", str(roberta_dir), "--train-file", str(train), "--dev-file", str(dev),
        "--text-fields", "sentence", "--label-field", "label", "--task-name", "cue", "--metrics", "acc,mcc",
        "--lr", "3e-3", "--batch-size", "16", "--epochs", "6", "--seeds", "3", "--max-length", "32",
        "--output-dir", str(output), "--no-progress",
    ])
    assert code == 0
    results = json.loads((output / "results.json").read_text())
    task = results["tasks"]["cue"]
    assert len(task["runs"]) == 3 and all(len(run["epoch_metrics"]) == 6 for run in task["runs"])
    assert task["score"] > majority + 15, (task["score"], majority)
    assert task["metrics"]["mcc"] > 50
    # The reported number is the median over seeds of each run's best epoch.
    best_per_run = sorted(max((epoch["acc"] + epoch["mcc"]) / 2 for epoch in run["epoch_metrics"])
                          for run in task["runs"])
    assert task["score"] == pytest.approx(best_per_run[1])
    assert results["average"] == pytest.approx(task["score"])
    table = (output / "results.md").read_text()
    assert "| cue | Avg. |" in table and "Acc/Mcc" in table
    assert table.splitlines()[0] in capsys.readouterr().out
    assert not list(output.glob(".*tmp"))  # atomic writes leave no temporary files

    # The driver's run for seed 1 is reproduced exactly by a direct call with the same settings (deterministic).
    config = FinetuneConfig(model_path=str(roberta_dir), output_dir=str(output), max_length=32, progress=False)
    spec = glue.custom_task("cue", str(train), str(dev), ["sentence"], "label", metrics=["acc", "mcc"])
    data = glue.load_task(spec)
    tokenizer = finetune.load_tokenizer(str(roberta_dir))
    encoded_train = finetune.encode_examples(tokenizer, data.train, 32)
    encoded_dev = {"": finetune.encode_examples(tokenizer, data.dev[""], 32)}
    outcome, best_state = finetune.train_run(data, encoded_train, encoded_dev, str(roberta_dir),
                                             GridPoint(3e-3, 16, 6), 1, config, torch.device("cpu"),
                                             tokenizer.pad_token_id, keep_best_state=True)
    seed_one = next(run for run in task["runs"] if run["seed"] == 1)
    assert outcome.epoch_metrics == seed_one["epoch_metrics"] and outcome.best_epoch == seed_one["best_epoch"]
    assert best_state is not None and "classifier.out_proj.weight" in best_state


def _glue_rows(count: int, seed: int) -> list[tuple[str, str, int]]:
    rows = []
    for row in _cue_rows(count, seed, positive_fraction=0.5):
        rows.append((row["sentence"], "a tiger" if row["label"] else "nothing here", row["label"]))
    return rows


def _write_glue(root: Path) -> None:
    """Tiny MNLI, RTE and STS-B directories in the official layout."""
    mnli_header = ("index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\t"
                   "sentence1_parse\tsentence2_parse\tsentence1\tsentence2\tlabel1\tgold_label")
    mnli_labels = ("contradiction", "entailment", "neutral")
    (root / "MNLI").mkdir(parents=True)
    for name, seed in (("train.tsv", 1), ("dev_matched.tsv", 2), ("dev_mismatched.tsv", 3)):
        lines = [mnli_header]
        for index, (first, second, label) in enumerate(_glue_rows(48, seed)):
            gold = mnli_labels[label + (index % 2)]
            lines.append(f"{index}\t{index}\t{index}x\tgov\t(a)\t(b)\t(a)\t(b)\t{first}\t{second}\t{gold}\t{gold}")
        (root / "MNLI" / name).write_text("\n".join(lines) + "\n")
    (root / "RTE").mkdir()
    (root / "STS-B").mkdir()
    for name, seed in (("train.tsv", 4), ("dev.tsv", 5)):
        rows = _glue_rows(32, seed)
        rte = ["index\tsentence1\tsentence2\tlabel"] + [
            f"{index}\t{first}\t{second}\t{'entailment' if label else 'not_entailment'}"
            for index, (first, second, label) in enumerate(rows)]
        (root / "RTE" / name).write_text("\n".join(rte) + "\n")
        sts = ["index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore"] + [
            f"{index}\tmain\tx\t2012\t{index}\tnone\tnone\t{first}\t{second}\t{4.0 * label + (index % 3) / 3:.3f}"
            for index, (first, second, label) in enumerate(rows)]
        (root / "STS-B" / name).write_text("\n".join(sts) + "\n")


def test_glue_tasks_from_mnli_on_prelayernorm(prelayernorm_dir, tmp_path):
    data_dir = tmp_path / "glue"
    _write_glue(data_dir)
    output = tmp_path / "out"
    code = finetune.main([
        "--model", str(prelayernorm_dir), "--data-dir", str(data_dir), "--tasks", "RTE,STS-B,MNLI",
        "--init-from", "mnli", "--lr", "3e-3", "--batch-size", "16", "--epochs", "2", "--seeds", "1",
        "--max-length", "40", "--output-dir", str(output), "--no-progress", "--name", "3ML-tiny",
    ])
    assert code == 0
    results = json.loads((output / "results.json").read_text())
    assert list(results["tasks"]) == ["MNLI", "RTE", "STS-B"]  # MNLI runs first
    mnli_model = output / "MNLI" / "best_model"
    assert (mnli_model / "model.safetensors").is_file() and (mnli_model / "tokenizer.json").is_file()
    assert results["tasks"]["RTE"]["init_from"] == str(mnli_model)
    assert results["tasks"]["STS-B"]["init_from"] == str(mnli_model)
    assert results["tasks"]["MNLI"]["init_from"] == str(prelayernorm_dir)
    assert set(results["tasks"]["MNLI"]["metrics"]) == {"acc_m", "acc_mm"}
    sts = results["tasks"]["STS-B"]
    assert set(sts["metrics"]) == {"pearson", "spearman"}
    assert sts["score"] == pytest.approx((sts["metrics"]["pearson"] + sts["metrics"]["spearman"]) / 2)
    scores = [results["tasks"][name]["score"] for name in ("MNLI", "RTE", "STS-B")]
    assert results["average"] == pytest.approx(sum(scores) / 3) and results["all_glue_tasks"] is False
    table = (output / "results.md").read_text().splitlines()
    assert table[0] == "| Model | STS-B | MNLI-m/mm | RTE | Avg. |"
    assert table[1] == "|  | Pear/Spea | Acc | Acc |  |"
    assert table[3].startswith("| 3ML-tiny | ")

    # The MNLI model's 3-way head is replaced by a 2-way one for RTE; the encoder is MNLI's.
    rte = glue.load_task(glue.glue_task("RTE"), data_dir)
    from_mnli = finetune.load_classifier(str(mnli_model), rte, seed=7)
    from safetensors.torch import load_file

    mnli_weights = load_file(str(mnli_model / "model.safetensors"))
    assert mnli_weights["classifier.out_proj.weight"].shape[0] == 3
    assert from_mnli.classifier.out_proj.weight.shape[0] == 2
    embedding_key = next(key for key in mnli_weights if key.endswith("word_embeddings.weight"))
    assert torch.equal(from_mnli.state_dict()[embedding_key], mnli_weights[embedding_key])
    # The fresh head depends only on the seed.
    same = finetune.load_classifier(str(mnli_model), rte, seed=7)
    other = finetune.load_classifier(str(mnli_model), rte, seed=8)
    assert torch.equal(same.classifier.out_proj.weight, from_mnli.classifier.out_proj.weight)
    assert not torch.equal(other.classifier.out_proj.weight, from_mnli.classifier.out_proj.weight)


# ------------------------------------------------------------------------------------------------ errors


def _cli_error(capsys, argv: list[str]) -> str:
    code = finetune.main(argv + ["--no-progress"])
    captured = capsys.readouterr()
    assert code == 1
    assert "Traceback" not in captured.err
    error_lines = [line for line in captured.err.splitlines() if line.startswith("error: ")]
    assert len(error_lines) == 1, captured.err
    return error_lines[0]


def test_cli_bad_inputs(roberta_dir, tmp_path, capsys):
    output = str(tmp_path / "out")
    message = _cli_error(capsys, ["--model", str(tmp_path / "missing"), "--tasks", "RTE", "--data-dir",
                                  str(tmp_path), "--output-dir", output])
    assert "no Hugging Face model at" in message and "missing/config.json" in message
    message = _cli_error(capsys, ["--model", str(roberta_dir), "--tasks", "CoLA", "--data-dir",
                                  str(tmp_path / "glue"), "--output-dir", output])
    assert message.endswith(f"expected file not found: {tmp_path / 'glue' / 'CoLA' / 'train.tsv'}")

    train = _write_jsonl(tmp_path / "train.jsonl", [{"text": "a", "y": "pos"}, {"text": "b", "y": "neg"}])
    dev = _write_jsonl(tmp_path / "dev.jsonl", [{"text": "c", "y": "other"}])
    common = ["--model", str(roberta_dir), "--train-file", str(train), "--text-fields", "text",
              "--output-dir", output]
    message = _cli_error(capsys, common + ["--dev-file", str(dev), "--label-field", "y"])
    assert "unknown label 'other'" in message
    message = _cli_error(capsys, common + ["--dev-file", str(dev), "--label-field", "target"])
    assert "missing field 'target'" in message
    (tmp_path / "empty.jsonl").write_text("")
    message = _cli_error(capsys, common + ["--dev-file", str(tmp_path / "empty.jsonl"), "--label-field", "y"])
    assert "empty.jsonl: no examples" in message
    message = _cli_error(capsys, common + ["--label-field", "y"])
    assert "needs --train-file, --dev-file, --text-fields and --label-field" in message
    message = _cli_error(capsys, ["--model", str(roberta_dir), "--tasks", "RTE", "--init-from", "mnli",
                                  "--output-dir", output])
    assert "--init-from mnli needs MNLI" in message
    message = _cli_error(capsys, ["--model", str(roberta_dir), "--tasks", "RTE", "--data-dir", str(tmp_path),
                                  "--precision", "fp16", "--device", "cpu", "--output-dir", output])
    assert "fp16 needs a GPU" in message


def test_resume_reuses_logged_runs(roberta_dir, tmp_path, capsys):
    rows = _cue_rows(80, seed=3)
    train = _write_jsonl(tmp_path / "train.jsonl", rows[:60])
    dev = _write_jsonl(tmp_path / "dev.jsonl", rows[60:])
    output = tmp_path / "out"
    argv = ["--model", str(roberta_dir), "--train-file", str(train), "--dev-file", str(dev), "--text-fields",
            "sentence", "--label-field", "label", "--lr", "1e-3", "--batch-size", "16", "--epochs", "1",
            "--seeds", "3", "--max-length", "32", "--output-dir", str(output), "--no-progress", "--save-best-model"]
    assert finetune.main(argv) == 0
    log = output / "custom" / "runs.jsonl"
    first = [json.loads(line) for line in log.read_text().splitlines()]
    assert [record["seed"] for record in first] == [1, 2, 3]
    assert (output / "custom" / "best_model" / "model.safetensors").is_file()
    # Interrupted after the first run, while appending the second.
    log.write_text(log.read_text().splitlines()[0] + "\n" + '{"grid_point": {"learn')
    assert finetune.main(argv + ["--resume"]) == 0
    resumed = json.loads((output / "results.json").read_text())["tasks"]["custom"]["runs"]
    assert resumed[0]["seconds"] == first[0]["seconds"]  # reused, not re-run
    assert [run["epoch_metrics"] for run in resumed] == [record["epoch_metrics"] for record in first]
    assert [json.loads(line)["seed"] for line in log.read_text().splitlines()] == [1, 2, 3]  # torn line dropped
    # Different settings: the log is not silently mixed in.
    message = _cli_error(capsys, argv + ["--resume", "--max-length", "24"])
    assert "runs were logged with other settings" in message
