"""The tiktoken fast path (pipeline.data.fast_bpe): exactly HF tokenizers' ids, or a fallback to HF tokenizers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pipeline.data.fast_bpe import BYTE_LEVEL_PATTERN, build_fast_bpe, bytes_to_unicode
from pipeline.data.preprocess import PreprocessConfig, preprocess
from pipeline.data.tokenizer import TrainConfig, import_tokenizer, load_raw_tokenizer, train_tokenizer

SHARED_GPT2 = Path(__file__).resolve().parents[2] / "shared" / "tokenizers" / "gpt2-bpe"

TRICKY_TEXTS = [
    "", " ", "  ", "\n", "\n\n\n", "\t \t", "a", "ab", "a  b", "a \n b", "trailing spaces   ", "   leading",
    "tabs\tand\nnewlines\r\nand\rcarriage returns", "no-break\u00a0space and\u3000ideographic space \u2003em",
    "x" * 5000, " " * 3000, "ab" * 2000, "\n" * 500 + "end",
    # numbers
    "1234567890", "3.14159 2,718 1e-10 -42 +7 0x1F 1_000_000", "٣٤٥ ೧೨ Ⅻ ½ ²³ ①", "in 1999, 2000s and '90s",
    # contractions (GPT-2's regex takes 's 't 're 've 'm 'll 'd, case-sensitively)
    "don't I'll we've they're she'd I'm it's", "DON'T I'LL WE'VE", "'s 't 're 've 'm 'll 'd", "rock 'n' roll",
    "''quoted''", "it’s curly", "x's's'ss", "''s",
    # unicode
    "naïve café résumé façade Ærøskøbing straße ǅ ﬁ", "Ελληνικά кириллица עברית العربية हिन्दी ไทย 한국어",
    "日本語のテキスト、句読点。中文，標點！", "combining: e\u0301 a\u0308 \u0301\u0301", "zero\u200bwidth\u200djoiner\ufeffbom",
    "math ∑∫√∞ ≤≥ ≠ → ⇒ ∀x∈ℝ", "\u0000\u0001\u0007\u001b[31m control \u007f\u0085\u2028\u2029",
    "replacement \ufffd char", "private \ue000\U000f0000 use", "ancient 𐌰𐌱 𓀀 𝔘𝔫𝔦",
    # emoji: plain, skin tones, ZWJ sequences, flags, keycaps
    "emoji 😀😃😄 👍🏽 👨‍👩‍👧‍👦 🏳️‍🌈 🇺🇸🇯🇵 1️⃣ #️⃣ ❤️", "😀" * 300, " 😀 😀  😀",
    # code and markup
    "def f(x):\n    return x**2  # comment\n\tif a != b: pass", "<html><body class=\"x\">&amp;</body></html>",
    "http://example.com/path?q=1&r=2#frag user@mail.org", "$ ls -la | grep 'x' > /dev/null 2>&1",
    "{\"key\": [1, 2.5, null, true]}", "-----===== ***** ..... !!!!! ?????",
]
# Added tokens are matched in the raw text by HF (even without add_special_tokens): those texts go to HF.
ADDED_TOKEN_TEXTS = ["<s>", "a <mask> b", "<pad></s><unk>", "x<s>y", "The <mask>.", "  <mask>  ", "<|endoftext|> a"]


def _hf_ids(tokenizer, texts):
    return [encoding.ids for encoding in tokenizer.encode_batch(texts, add_special_tokens=False)]


def _code_point_texts(step: int = 64) -> list[str]:
    """Every code point below U+3400 (alphabets, digits, spaces, punctuation, symbols) and every 5th one above
    (without surrogates), each between letters, digits and spaces: where the two regex engines' Unicode classes
    (\\p{L}, \\p{N}, \\s) could disagree. (All 1.1M code points in 4 contexts agree too; too slow for a test.)"""
    characters = [chr(c) for c in list(range(0x3400)) + list(range(0x3400, 0x110000, 5)) if not 0xD800 <= c < 0xE000]
    texts = []
    for start in range(0, len(characters), step):
        block = characters[start:start + step]
        texts += ["".join(block), "a".join(block) + " 1".join(block) + "  \n " + " ".join(block)]
    return texts


@pytest.fixture(scope="module")
def lee_lines(english_text_file) -> list[str]:
    return [line.strip() for line in english_text_file.read_text(encoding="utf-8").splitlines() if line.strip()]


@pytest.fixture(scope="module")
def trained_5k(tmp_path_factory, english_text_file) -> Path:
    return train_tokenizer([english_text_file], tmp_path_factory.mktemp("trained_5k") / "tokenizer.json",
                           TrainConfig(vocab_size=5000, min_frequency=1))


@pytest.fixture(scope="module")
def gpt2_style(tmp_path_factory, english_text_file) -> Path:
    """A GPT-2-style vocab.json + merges.txt (<|endoftext|> in the vocabulary) imported by pipeline.data.tokenizer."""
    from tokenizers import ByteLevelBPETokenizer

    directory = tmp_path_factory.mktemp("gpt2_style")
    gpt2_like = ByteLevelBPETokenizer()
    gpt2_like.train([str(english_text_file)], vocab_size=2000, min_frequency=2, special_tokens=["<|endoftext|>"],
                    show_progress=False)
    vocab_file, merges_file = gpt2_like.save_model(str(directory))
    return import_tokenizer(vocab_file, merges_file, directory / "tokenizer.json")


@pytest.fixture(scope="module")
def real_gpt2(tmp_path_factory) -> Path:
    if not (SHARED_GPT2 / "vocab.json").is_file():
        pytest.skip(f"GPT-2 vocabulary not available at {SHARED_GPT2}")
    return import_tokenizer(SHARED_GPT2 / "vocab.json", SHARED_GPT2 / "merges.txt",
                            tmp_path_factory.mktemp("gpt2") / "tokenizer.json")


@pytest.mark.parametrize("which", ["tiny_tokenizer", "trained_5k", "gpt2_style", "real_gpt2"])
def test_fast_path_gives_exactly_hf_ids(which, request, lee_lines):
    tokenizer = load_raw_tokenizer(request.getfixturevalue(which))
    fast, description = build_fast_bpe(tokenizer)
    assert fast is not None, description
    assert "tiktoken" in description
    texts = lee_lines + TRICKY_TEXTS + ADDED_TOKEN_TEXTS + ["\n".join(lee_lines[:50])]
    assert fast.encode_batch(texts) == _hf_ids(tokenizer, texts)
    assert fast.first_mismatch(texts) is None


def test_fast_path_matches_hf_across_unicode(trained_5k):
    tokenizer = load_raw_tokenizer(trained_5k)
    fast, _ = build_fast_bpe(tokenizer)
    texts = _code_point_texts()
    assert fast.encode_batch(texts) == _hf_ids(tokenizer, texts)


def test_texts_with_added_tokens_and_lone_surrogates_behave_as_in_hf(tiny_tokenizer):
    tokenizer = load_raw_tokenizer(tiny_tokenizer)
    fast, _ = build_fast_bpe(tokenizer)
    ids = fast.encode_batch(["a <mask> b", "<s>"])
    assert 4 in ids[0] and ids[1] == [0]  # HF matches <mask> (eating the space before it) and <s> in raw text
    assert ids == _hf_ids(tokenizer, ["a <mask> b", "<s>"])
    with pytest.raises(Exception) as from_hf:
        tokenizer.encode_batch(["a\ud800b"], add_special_tokens=False)
    with pytest.raises(type(from_hf.value)):
        fast.encode_batch(["a\ud800b"])


def _byte_level_tokenizer(vocab: dict[str, int], merges: list[tuple[str, str]]):
    from tokenizers import Tokenizer, models, pre_tokenizers

    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    return tokenizer


def test_token_hf_cannot_reach_is_left_out_where_naive_tiktoken_would_differ():
    import tiktoken

    # "bc" merges before "ab", so HF encodes "abc" as [a, bc] and never applies ("ab", "c"); tiktoken on the bare
    # ranks merges a + bc into "abc" because the concatenation is in its table.
    alphabet = list(bytes_to_unicode().values())
    vocab = {character: index for index, character in enumerate(alphabet)}
    merges = [("b", "c"), ("a", "b"), ("ab", "c")]
    for left, right in merges:
        vocab[left + right] = len(vocab)
    tokenizer = _byte_level_tokenizer(vocab, merges)
    texts = ["abc", "xabcx", "ab", "bc", "abcabc abc", "cab"]
    hf = _hf_ids(tokenizer, texts)
    assert hf[0] == [vocab["a"], vocab["bc"]]
    to_byte = {character: byte for byte, character in bytes_to_unicode().items()}
    naive = tiktoken.Encoding("naive", pat_str=BYTE_LEVEL_PATTERN, special_tokens={}, mergeable_ranks={
        bytes(to_byte[c] for c in token): token_id for token, token_id in vocab.items()})
    assert naive.encode_ordinary("abc") == [vocab["abc"]]  # the corner case the exactness check is for
    fast, description = build_fast_bpe(tokenizer)
    assert fast is not None and fast.excluded_tokens == 1 and "1 unreachable" in description
    assert fast.encode_batch(texts) == hf


def test_ids_not_in_merge_order_are_mapped_back(tmp_path, tiny_tokenizer, lee_lines):
    config = json.loads(Path(tiny_tokenizer).read_text(encoding="utf-8"))
    vocab = config["model"]["vocab"]
    merged = [left + right for left, right in config["model"]["merges"]]
    old_ids = sorted(vocab[token] for token in merged)
    for token, new_id in zip(merged, reversed(old_ids)):  # later merges get smaller ids
        vocab[token] = new_id
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(config), encoding="utf-8")
    tokenizer = load_raw_tokenizer(path)
    fast, _ = build_fast_bpe(tokenizer)
    assert fast is not None and fast.rank_to_id is not None
    texts = lee_lines[:100] + TRICKY_TEXTS + ADDED_TOKEN_TEXTS
    assert fast.encode_batch(texts) == _hf_ids(tokenizer, texts)


def _edited_tokenizer(tmp_path: Path, source: Path, edit) -> Path:
    config = json.loads(Path(source).read_text(encoding="utf-8"))
    edit(config)
    path = tmp_path / "edited" / "tokenizer.json"
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(config), encoding="utf-8")
    return path


@pytest.mark.parametrize("edit, reason", [
    (lambda c: c.update(normalizer={"type": "Lowercase"}), "normalizer"),
    (lambda c: c["pre_tokenizer"].update(add_prefix_space=True), "prefix space"),
    (lambda c: c.update(pre_tokenizer={"type": "Whitespace"}), "pre-tokenizer is Whitespace"),
    (lambda c: c["model"].update(dropout=0.1), "dropout"),
    (lambda c: c["model"].update(byte_fallback=True), "byte fallback"),
    (lambda c: c["model"].update(ignore_merges=True), "ignores merges"),
    (lambda c: c.update(padding={"strategy": "BatchLongest", "direction": "Right", "pad_to_multiple_of": None,
                                 "pad_id": 1, "pad_type_id": 0, "pad_token": "<pad>"}), "pads"),
])
def test_tokenizers_it_cannot_reproduce_fall_back(tmp_path, tiny_tokenizer, edit, reason):
    fast, description = build_fast_bpe(load_raw_tokenizer(_edited_tokenizer(tmp_path, tiny_tokenizer, edit)))
    assert fast is None and reason in description


def test_lowercase_trained_tokenizer_falls_back(tmp_path, english_text_file):
    path = train_tokenizer([english_text_file], tmp_path / "tokenizer.json",
                           TrainConfig(vocab_size=500, lowercase=True))
    fast, description = build_fast_bpe(load_raw_tokenizer(path))
    assert fast is None and "normalizer" in description


def _documents_file(tmp_path: Path, lee_lines: list[str]) -> Path:
    text = "\n".join(lee_lines[:150] + TRICKY_TEXTS[:20] + ADDED_TOKEN_TEXTS + ["naïve 😀 don't   x"] * 3)
    path = tmp_path / "docs.txt"
    path.write_text(text + "\n", encoding="utf-8")
    return path


def _run(tmp_path, inputs, tokenizer, name, **overrides):
    settings = dict(one_doc_per_line=True, valid_fraction=0.05, seed=7, workers=1, show_progress=False)
    settings.update(overrides)
    meta = preprocess(PreprocessConfig(inputs=inputs, tokenizer=tokenizer, output_prefix=tmp_path / name,
                                       **settings))
    files = {suffix: (tmp_path / f"{name}{suffix}").read_bytes()
             for suffix in ("_train.bin", "_train.idx", "_valid.bin", "_valid.idx")}
    return meta, files


@pytest.mark.parametrize("workers", [1, 2])
def test_preprocess_fast_and_hf_write_identical_datasets(tmp_path, tiny_tokenizer, lee_lines, workers, capsys):
    inputs = [_documents_file(tmp_path, lee_lines)]
    fast_meta, fast_files = _run(tmp_path, inputs, tiny_tokenizer, "fast", workers=workers)
    assert "preprocess: tokenizing with tiktoken" in capsys.readouterr().err
    hf_meta, hf_files = _run(tmp_path, inputs, tiny_tokenizer, "hf", workers=workers, fast_tokenizer=False)
    assert "preprocess: tokenizing with HF tokenizers (fast path disabled)" in capsys.readouterr().err
    assert fast_meta["tokenizer"]["engine"] == "tiktoken" and hf_meta["tokenizer"]["engine"] == "tokenizers"
    assert fast_files == hf_files
    assert fast_meta["splits"] == hf_meta["splits"]


def test_preprocess_logs_and_falls_back_for_a_tokenizer_with_a_normalizer(tmp_path, tiny_tokenizer, lee_lines,
                                                                          capsys):
    tokenizer = _edited_tokenizer(tmp_path, tiny_tokenizer, lambda c: c.update(normalizer={"type": "Lowercase"}))
    meta, _ = _run(tmp_path, [_documents_file(tmp_path, lee_lines)], tokenizer, "norm")
    error = capsys.readouterr().err
    assert "preprocess: tokenizing with HF tokenizers: no exact tiktoken fast path because it has a normalizer" in error
    assert meta["tokenizer"]["engine"] == "tokenizers"


def test_runtime_guard_falls_back_when_the_first_documents_differ(tmp_path, tiny_tokenizer, lee_lines, capsys,
                                                                  monkeypatch):
    import pipeline.data.preprocess as preprocess_module

    def broken_build(tokenizer):
        fast, description = build_fast_bpe(tokenizer)
        real = fast.encode_batch
        fast.encode_batch = lambda texts: [ids[:-1] for ids in real(texts)]  # drops each text's last token
        return fast, description

    monkeypatch.setattr(preprocess_module, "build_fast_bpe", broken_build)
    inputs = [_documents_file(tmp_path, lee_lines)]
    meta, files = _run(tmp_path, inputs, tiny_tokenizer, "guarded")
    assert "the tiktoken fast path gave other ids than HF tokenizers" in capsys.readouterr().err
    assert meta["tokenizer"]["engine"] == "tokenizers"
    monkeypatch.undo()
    _, expected = _run(tmp_path, inputs, tiny_tokenizer, "plain", fast_tokenizer=False)
    assert files == expected


def test_cli_no_fast_tokenizer_flag(tmp_path, tiny_tokenizer, lee_lines, capsys):
    from pipeline.data.preprocess import main

    inputs = _documents_file(tmp_path, lee_lines)
    assert main(["--input", str(inputs), "--tokenizer", str(tiny_tokenizer), "--output-prefix",
                 str(tmp_path / "cli"), "--one-doc-per-line", "--workers", "1", "--quiet",
                 "--no-fast-tokenizer"]) == 0
    assert "(fast path disabled)" in capsys.readouterr().err
    assert json.loads((tmp_path / "cli.meta.json").read_text())["tokenizer"]["engine"] == "tokenizers"
    assert np.fromfile(tmp_path / "cli_train.bin", dtype=np.uint16).size > 0
