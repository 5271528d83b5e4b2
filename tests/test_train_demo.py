"""The demo: text extraction, launch command, and a shortened run that must learn the word frequencies, to copy
visible tokens and to predict masked tokens from their context (masked-token perplexity below the unigram level
of the validation split), then export and fill in masks (the full demo is `make demo`, a few minutes)."""

from __future__ import annotations

import argparse
import json

from pipeline import demo
from pipeline.evaluation.report import read_metrics, unigram_perplexity

SHORT_STEPS = 400  # two thirds of `make demo`'s steps: ~2 min of pre-training on 2 idle cores


def test_wikipedia_articles_are_plain_english_paragraphs():
    articles = list(demo.wikipedia_articles(demo.gensim_test_data() / demo.WIKI_DUMP))
    assert len(articles) >= 90
    titles = [title for title, _ in articles]
    assert "Anarchism" in titles
    paragraphs = [p for _, ps in articles for p in ps]
    assert sum(len(p) for p in paragraphs) > 1_500_000
    for markup in ("'''", "[[", "{{", "<ref"):
        assert sum(markup in p for p in paragraphs) < 0.01 * len(paragraphs), markup
    assert all(len(p) >= demo.MIN_PARAGRAPH_CHARS for p in paragraphs)


def test_corpus_file_and_pretrain_command(tmp_path):
    stats = demo.write_corpus(tmp_path / "corpus.jsonl")
    assert stats["lee_documents"] == 300 and stats["wikipedia_articles"] >= 90
    first = json.loads((tmp_path / "corpus.jsonl").read_text().splitlines()[0])
    assert first["text"].startswith("Anarchism is a political philosophy")
    args = argparse.Namespace(ranks=2, batch_size=32, steps=600, lr=demo.DEMO_LR)
    command = demo.pretrain_command(args, tmp_path / "data", tmp_path / "tok.json", tmp_path / "run")
    joined = " ".join(command)
    assert "--nproc_per_node=2" in joined and "--deepspeed_config zero2_fp32.json" in joined
    assert "--architecture 3ml-self" in joined and "--micro-batch-size 16" in joined
    assert "--model-set pre_ln=true" in joined and "--model-set decoder_locality_bias=1.0" in joined
    assert "--model-set decoder_num_layers=2" in joined


def test_shortened_demo_learns_from_context_and_fills_in_masks(tmp_path, capsys):
    """Fewer steps than `make demo`. The masked-token perplexity falls from far above the unigram level (an
    untrained model) to below it (word frequencies alone cannot get there: the model uses the context); the
    unchanged tokens' perplexity falls far below it (the model reads the visible token at its position); the
    exported full model fills in masks."""
    out = tmp_path / "demo"
    status = demo.main(["--output-dir", str(out), "--steps", str(SHORT_STEPS)])
    printed = capsys.readouterr().out
    _, evals = read_metrics(out / "run")
    unigram = unigram_perplexity(out / "data" / "wiki_lee")
    first, last = evals[0], evals[-1]
    assert last["step"] == SHORT_STEPS
    assert first["ppl_masked"] > 2 * unigram, (first, unigram)
    assert last["ppl_masked"] < 0.95 * unigram, (last, unigram)
    assert last["ppl_unchanged"] < 0.5 * unigram, (last, unigram)
    assert status == 0 and f"x the unigram perplexity {unigram:.0f}" in printed
    assert (out / "export" / "3ml" / "model.safetensors").is_file() and (out / "run" / "loss_curves.png").is_file()
    assert printed.count("top predictions (probability)") == demo.INFILL_SENTENCES
    assert "top-1 correct: " in printed
