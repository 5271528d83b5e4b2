"""Fine-tuning: median-of-seeds aggregation, the paper's grid, RoBERTa input format, a tiny exported model that
learns a cue-word task (beats the majority baseline), the GLUE path with MNLI initialisation on a pre-LN model,
and clear CLI errors."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
import torch

from pipeline.evaluation import finetune, glue
from pipeline.errors import run_cli
from pipeline.evaluation.finetune import FinetuneConfig, GridPoint, RunOutcome
from pipeline.training.schedule import lr_multiplier

CUE = "zebra"


def _lee_lines() -> list[str]:
    import gensim

    path = Path(gensim.__file__).parent / "test" / "test_data" / "lee_background.cor"
    return path.read_text(encoding="utf-8").splitlines()


def _export_dir(directory: Path, pre_layer_norm: bool) -> Path:
    """What pipeline.evaluation.export writes: a tiny model (roberta or roberta-prelayernorm) plus the project's
    byte-level BPE tokenizer (RoBERTa's special tokens and post-processor), both via save_pretrained."""
    from transformers import RobertaConfig, RobertaForMaskedLM, RobertaPreLayerNormConfig, RobertaPreLayerNormForMaskedLM

    from pipeline.data.tokenizer import TrainConfig, load_tokenizer, train_tokenizer

    corpus = directory / "corpus.txt"
    # The cue words are in the tokenizer's training text so that each is a single token.
    corpus.write_text("\n".join(_lee_lines()[:60] + [f"a {CUE} and a tiger"] * 50) + "\n", encoding="utf-8")
    tokenizer = load_tokenizer(train_tokenizer([corpus], directory / "bpe", TrainConfig(vocab_size=400)))
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


def _hand_built_ids(tokenizer, texts: tuple[str, ...], max_length: int) -> list[int]:
    """The ids fine-tuning built by hand before it used the tokenizer's own template: <s> A </s>(</s> B </s>),
    longest-first truncation dropping one token at a time from the longer segment (the first on ties)."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    parts = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]
    if len(parts) == 1:
        return [bos, *parts[0][: max_length - 2], eos]
    budget, first, second = max_length - 4, len(parts[0]), len(parts[1])
    while first + second > budget:
        if first >= second:
            first -= 1
        else:
            second -= 1
    return [bos, *parts[0][:first], eos, eos, *parts[1][:second], eos]


def test_roberta_inputs_and_truncation(roberta_dir):
    tokenizer = finetune.load_tokenizer(str(roberta_dir))
    examples = glue.Examples(texts=[("the zebra", "a tiger"), ("one " * 40, "two"), ("only this", "")],
                             labels=[0, 1, 1])
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
    # An empty second text is still a pair.
    assert encoded.input_ids[2] == [0, *tokenizer("only this", add_special_tokens=False)["input_ids"], 2, 2, 2]
    single = finetune.encode_examples(tokenizer, glue.Examples([("one " * 40,)], [0]), max_length=12)
    assert single.input_ids[0] == [0, *second_a[:10], 2]
    batch = finetune.collate(encoded, [0, 1], finetune.make_collator(tokenizer), regression=False)
    assert batch["input_ids"].shape == (2, 24) and batch["attention_mask"][0].sum() == len(encoded.input_ids[0])
    assert (batch["input_ids"][0, len(encoded.input_ids[0]) :] == 1).all()
    assert (batch["attention_mask"][0, len(encoded.input_ids[0]) :] == 0).all() and batch["attention_mask"][1].all()
    assert batch["labels"].tolist() == [0, 1] and batch["labels"].dtype == torch.long
    scores = finetune.collate(finetune.EncodedSplit(encoded.input_ids, [0.5, 4.0, 1.0]), [2, 0],
                              finetune.make_collator(tokenizer), regression=True)
    assert scores["labels"].dtype == torch.float32 and scores["labels"].tolist() == [1.0, 0.5]


def test_tokenizer_template_equals_the_hand_built_ids(roberta_dir):
    """The tokenizer's own pair encoding gives the ids fine-tuning built by hand before, for single sentences and
    pairs of every length mix; the one documented difference is an odd token budget with both segments long."""
    tokenizer = finetune.load_tokenizer(str(roberta_dir))
    rng = random.Random(0)
    words = " ".join(_lee_lines()[100:300]).split()

    def text() -> str:
        start = rng.randrange(len(words) - 40)
        return " ".join(words[start : start + rng.randint(0, 30)])

    pairs = [(text(), text()) for _ in range(300)]
    for max_length in (4, 8, 24, 32, 128):  # even budgets: identical
        encoded = finetune.encode_examples(tokenizer, glue.Examples(pairs, [0] * len(pairs)), max_length)
        assert encoded.input_ids == [_hand_built_ids(tokenizer, pair, max_length) for pair in pairs]
    for max_length in (5, 13, 33):  # single sentences: identical for any length
        singles = [(first,) for first, _ in pairs]
        encoded = finetune.encode_examples(tokenizer, glue.Examples(singles, [0] * len(pairs)), max_length)
        assert encoded.input_ids == [_hand_built_ids(tokenizer, single, max_length) for single in singles]
    # Odd budget (13 - 4 = 9), both segments over half of it, the first the longer: the spare token goes to the
    # longer (first) segment, where the hand-built loop gave it to the second.
    long_a, long_b = "one " * 30, "one " * 20
    ids_a = tokenizer(long_a, add_special_tokens=False)["input_ids"]
    ids_b = tokenizer(long_b, add_special_tokens=False)["input_ids"]
    assert len(ids_a) > len(ids_b) > 5
    encoded = finetune.encode_examples(tokenizer, glue.Examples([(long_a, long_b), (long_b, long_a)], [0, 0]), 13)
    assert encoded.input_ids[0] == [0, *ids_a[:5], 2, 2, *ids_b[:4], 2]
    assert _hand_built_ids(tokenizer, (long_a, long_b), 13) == [0, *ids_a[:4], 2, 2, *ids_b[:5], 2]
    assert encoded.input_ids[1] == _hand_built_ids(tokenizer, (long_b, long_a), 13)  # second longer: the same


def test_tokenizer_without_the_roberta_template_is_refused(roberta_dir, tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(roberta_dir))
    tokenizer.backend_tokenizer.post_processor = None  # ids without <s> ... </s>
    tokenizer.save_pretrained(tmp_path)
    with pytest.raises(finetune.FinetuneError, match="does not build RoBERTa inputs"):
        finetune.load_tokenizer(str(tmp_path))


def test_one_learning_rate_schedule_with_pre_training():
    from transformers import get_linear_schedule_with_warmup

    warmup, total = 3, 10
    rates, hf_rates = [], []
    for make, out in ((finetune.linear_schedule, rates), (get_linear_schedule_with_warmup, hf_rates)):
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
        scheduler = make(optimizer, warmup, total)
        for _ in range(total):
            out.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            scheduler.step()
    assert rates == pytest.approx([2.0 * lr_multiplier(step, warmup, total) for step in range(total)])
    assert rates[:4] == pytest.approx([2 / 3, 4 / 3, 2.0, 2.0 * 7 / 7]) and rates[-1] == pytest.approx(2.0 / 7)
    # transformers' schedule: the same decay; its warm-up starts at 0 (one step behind).
    assert rates[warmup:] == pytest.approx(hf_rates[warmup:])
    assert hf_rates[:warmup] == pytest.approx([0.0, *rates[: warmup - 1]])


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
    assert not list(output.glob(".*tmp*"))  # atomic writes leave no temporary files

    # The driver's run for seed 1 is reproduced exactly by a direct call with the same settings (deterministic).
    config = FinetuneConfig(model_path=str(roberta_dir), output_dir=str(output), max_length=32, progress=False)
    spec = glue.custom_task("cue", str(train), str(dev), ["sentence"], "label", metrics=["acc", "mcc"])
    data = glue.load_task(spec)
    tokenizer = finetune.load_tokenizer(str(roberta_dir))
    encoded_train = finetune.encode_examples(tokenizer, data.train, 32)
    encoded_dev = {"": finetune.encode_examples(tokenizer, data.dev[""], 32)}
    outcome, best_state = finetune.train_run(data, encoded_train, encoded_dev, str(roberta_dir),
                                             GridPoint(3e-3, 16, 6), 1, config, torch.device("cpu"),
                                             finetune.make_collator(tokenizer), keep_best_state=True)
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
    code = run_cli(lambda: finetune.main(argv + ["--no-progress"]))  # as python -m pipeline finetune does
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
    # Settings that used to end in a traceback (or, for a negative count, silently drop the last examples).
    task = ["--model", str(roberta_dir), "--tasks", "RTE", "--data-dir", str(tmp_path), "--output-dir", output]
    for extra, expected in ((["--eval-batch-size", "0"], "--eval-batch-size must be at least 1"),
                            (["--base-seed", "-3"], "--base-seed must be in [0, 4294967291]"),
                            (["--max-train-examples", "-5"], "--max-train-examples must be at least 1"),
                            (["--max-grad-norm", "-1"], "--max-grad-norm must be >= 0"),
                            (["--device", "gpu"], "--device 'gpu' is not a torch device")):
        assert expected in _cli_error(capsys, task + extra)
    if not torch.cuda.is_available():
        assert "sees no CUDA GPU" in _cli_error(capsys, task + ["--device", "cuda"])


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
    umask = os.umask(0)
    os.umask(umask)
    assert {path.stat().st_mode & 0o777 for path in (output / "custom" / "best_model").iterdir()} == {0o666 & ~umask}
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


# ------------------------------------------------------------------------------- loading and output faults


def _copy_export(source: Path, target: Path, change) -> Path:
    """A copy of an export whose weights went through ``change(state dict)``."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(source, target)
    state = load_file(str(target / "model.safetensors"))
    change(state)
    save_file(state, str(target / "model.safetensors"), metadata={"format": "pt"})
    return target


def _binary_task() -> glue.TaskData:
    spec = glue.custom_task("cue", "t.jsonl", "d.jsonl", ["sentence"], "label")
    return glue.TaskData(spec, glue.Examples(), {}, label_names=("0", "1"))


def test_an_encoder_tensor_of_another_shape_is_refused_not_reinitialised(roberta_dir, tmp_path):
    """Risk 1: ignore_mismatched_sizes used to re-initialise any encoder tensor whose shape differs, silently."""
    key = "roberta.encoder.layer.0.intermediate.dense.weight"

    def narrower(state):
        state[key] = state[key][:48].clone()  # the model's config says 64 rows

    altered = _copy_export(roberta_dir, tmp_path / "altered", narrower)
    with pytest.raises(finetune.FinetuneError) as error:
        finetune.load_classifier(str(altered), _binary_task(), seed=1)
    message = str(error.value)
    assert "\n" not in message and "encoder would start from random weights" in message
    assert f"{key} (checkpoint [48, 32], model [64, 32])" in message

    def without_embeddings(state):
        del state["roberta.embeddings.word_embeddings.weight"]

    missing = _copy_export(roberta_dir, tmp_path / "missing", without_embeddings)
    with pytest.raises(finetune.FinetuneError, match="missing: roberta.embeddings.word_embeddings.weight"):
        finetune.load_classifier(str(missing), _binary_task(), seed=1)


def test_only_the_classification_head_may_differ(roberta_dir, tmp_path):
    from safetensors.torch import load_file

    # An MNLI-like export (3-way head) loaded for a 2-label task: the head is re-initialised, the encoder kept.
    three_way = glue.TaskData(_binary_task().spec, glue.Examples(), {}, label_names=("a", "b", "c"))
    mnli = finetune.load_classifier(str(roberta_dir), three_way, seed=3)
    mnli.save_pretrained(tmp_path / "mnli")
    rte = finetune.load_classifier(str(tmp_path / "mnli"), _binary_task(), seed=3)
    assert rte.classifier.out_proj.weight.shape == (2, 32)
    assert torch.equal(rte.classifier.dense.weight, mnli.classifier.dense.weight)  # same shape: loaded
    saved = load_file(str(roberta_dir / "model.safetensors"))
    for name, tensor in rte.roberta.state_dict().items():
        assert torch.equal(tensor, saved[f"roberta.{name}"]), name


def test_a_pre_training_run_directory_gets_the_export_command(tmp_path, capsys):
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "config.json").write_text(json.dumps({"model": {"hidden_size": 32}}))
    message = _cli_error(capsys, ["--model", str(run_dir), "--tasks", "RTE", "--data-dir", str(tmp_path),
                                  "--output-dir", str(tmp_path / "out")])
    assert message == (f"error: --model {run_dir}: this is a pre-training run: export it first with python -m "
                       f"pipeline export {run_dir} --output HF_DIR, then pass --model HF_DIR")
    tag_dir = run_dir / "checkpoints" / "step_00000010"
    tag_dir.mkdir()
    (tag_dir / "run_config.json").write_text("{}")
    message = _cli_error(capsys, ["--model", str(tag_dir), "--tasks", "RTE", "--output-dir", str(tmp_path / "o")])
    assert "this is a pre-training checkpoint: export it first with python -m pipeline export" in message


def _small_cue_task(tmp_path: Path) -> list[str]:
    rows = _cue_rows(40, seed=5)
    train = _write_jsonl(tmp_path / "train.jsonl", rows[:30])
    dev = _write_jsonl(tmp_path / "dev.jsonl", rows[30:])
    return ["--train-file", str(train), "--dev-file", str(dev), "--text-fields", "sentence", "--label-field",
            "label", "--lr", "1e-3", "--batch-size", "16", "--epochs", "1", "--seeds", "1", "--max-length", "24"]


def test_output_failures_are_one_line_naming_the_path(roberta_dir, tmp_path, capsys):
    import errno
    from unittest import mock

    from safetensors import SafetensorError

    task = _small_cue_task(tmp_path)
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    message = _cli_error(capsys, ["--model", str(roberta_dir), *task, "--output-dir", str(blocker / "out")])
    assert message.startswith(f"error: {blocker / 'out'}") and "not a directory" in message

    # A full disk during a write raises an OSError without a file name; the message still names the file.
    output = tmp_path / "out"
    with mock.patch("os.fsync", side_effect=OSError(errno.ENOSPC, "No space left on device")):
        message = _cli_error(capsys, ["--model", str(roberta_dir), *task, "--output-dir", str(output)])
    assert message == f"error: {output / 'custom' / 'runs.jsonl'}: cannot write (no space left on device)"

    # safetensors' own error while saving the best model: one line naming the model directory, nothing left over.
    failing = SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    with mock.patch("transformers.modeling_utils.safe_save_file", side_effect=failing):
        message = _cli_error(capsys, ["--model", str(roberta_dir), *task, "--output-dir", str(output),
                                      "--save-best-model"])
    assert message == f"error: {output / 'custom' / 'best_model'}: cannot write (no space left on device)"
    assert sorted(path.name for path in (output / "custom").iterdir()) == ["runs.jsonl"]
