"""The demo's text extraction and launch command (the full demo is `make demo`, a few minutes)."""

from __future__ import annotations

import argparse
import json

from pipeline import demo


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
    args = argparse.Namespace(ranks=2, batch_size=32, steps=600, lr=2e-3)
    command = demo.pretrain_command(args, tmp_path / "data", tmp_path / "tok.json", tmp_path / "run")
    joined = " ".join(command)
    assert "--nproc_per_node=2" in joined and "--deepspeed_config zero2_fp32.json" in joined
    assert "--architecture 3ml-self" in joined and "--micro-batch-size 16" in joined
    assert "--model-set pre_ln=true" in joined
