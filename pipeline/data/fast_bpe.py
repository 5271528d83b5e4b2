"""An exact ``tiktoken`` fast path for the byte-level BPE tokenizers of ``pipeline.data.tokenizer``.

HF ``tokenizers`` encodes about 2-3 MB of text per CPU second here; ``tiktoken`` (Rust, rank-based BPE) encodes the
same vocabulary 5x faster. ``build_fast_bpe(tokenizer)`` returns a ``FastByteLevelBPE`` that gives exactly the ids
of ``tokenizer.encode_batch(texts, add_special_tokens=False)``, or None and the reason when it cannot guarantee it.

Why the ids are the same. HF's BPE repeatedly merges the leftmost occurrence of the adjacent pair with the lowest
merge-list rank; tiktoken repeatedly merges the leftmost adjacent pair whose *concatenation* has the lowest rank.
With rank(T) = the merge-list index of the merge producing T, both pick the same pair as long as every adjacent
pair (x, y) that can occur while encoding, with x + y in the vocabulary, is the merge that produces x + y. Within a
pre-token, the merges that built two adjacent tokens x, y from their bytes are (in order) a prefix of HF's greedy
run on the bytes of x + y alone: no merge crossed their edges, and greedy picks among their inner pairs in rank
order whatever happens around them. So if HF encodes the bytes of every vocabulary token T to [T] by itself, a
state [.., x, y, ..] with x + y = T can only be the last step of that run, i.e. (x, y) is T's merge. That is
checked when building (about 50 ms for 50k tokens); tokens that HF cannot produce from their own bytes are left
out of tiktoken's ranks (HF can never produce them, so tiktoken must not either). The rest of the tokenizer must
be one this reproduces: no normalizer, the ByteLevel pre-tokenizer (GPT-2 regex, no prefix space), a plain BPE
model (no dropout, no subword prefix/suffix, no byte fallback, merges not ignored, all 256 byte symbols in the
vocabulary), no padding or truncation. Added tokens (``<s>``, ``<mask>``, ...) are matched in the raw text by HF:
texts containing one are encoded by HF itself. Texts tiktoken cannot take (lone surrogates) go to HF too.
"""

from __future__ import annotations

import json
import re
from functools import lru_cache

import numpy as np

# tokenizers' ByteLevel pre-tokenizer regex (tokenizers/src/pre_tokenizers/byte_level.rs), GPT-2's.
BYTE_LEVEL_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table, used by byte-level BPE vocabularies."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1))
    characters = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            characters.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, characters)))


class FastByteLevelBPE:
    """tiktoken encoder whose ids are those of the HF tokenizer it was built from (see the module docstring)."""

    def __init__(self, tokenizer, encoding, rank_to_id: np.ndarray | None, added_contents: tuple[str, ...],
                 excluded_tokens: int):
        self.tokenizer = tokenizer  # HF tokenizers.Tokenizer: texts with added tokens, and verification
        self.encoding = encoding
        self.rank_to_id = rank_to_id  # None: tiktoken ranks are the HF ids
        self.added_contents = added_contents
        # Finds any added token's text (one regex search per text is cheaper than one `in` per added token).
        self._added_search = re.compile("|".join(map(re.escape, added_contents))).search if added_contents else None
        self.excluded_tokens = excluded_tokens  # vocabulary tokens BPE cannot produce (left out of the ranks)
        # The Rust method itself: Encoding.encode_ordinary would also mend lone surrogates, which HF rejects.
        self._encode_ordinary = encoding._core_bpe.encode_ordinary

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text: exactly
        ``[e.ids for e in tokenizer.encode_batch(texts, add_special_tokens=False)]``."""
        encode, added = self._encode_ordinary, self._added_search
        results: list[list[int] | None] = []
        to_hf: list[int] = []
        for index, text in enumerate(texts):
            if added is not None and added(text):
                to_hf.append(index)
                results.append(None)
                continue
            try:
                results.append(encode(text))
            except (UnicodeEncodeError, TypeError, ValueError):  # e.g. lone surrogates: HF's call, HF's outcome
                to_hf.append(index)
                results.append(None)
        if self.rank_to_id is not None:
            lookup = self.rank_to_id
            results = [None if ranks is None else lookup[np.asarray(ranks, dtype=np.int64)].tolist()
                       for ranks in results]
        if to_hf:
            for index, encoding in zip(to_hf, self.tokenizer.encode_batch([texts[index] for index in to_hf],
                                                                          add_special_tokens=False)):
                results[index] = encoding.ids
        return results

    def first_mismatch(self, texts: list[str]) -> int | None:
        """Index of the first text whose fast ids differ from HF's, or None (a cheap runtime guard)."""
        slow = self.tokenizer.encode_batch(texts, add_special_tokens=False)
        for index, (fast_ids, encoding) in enumerate(zip(self.encode_batch(texts), slow)):
            if fast_ids != encoding.ids:
                return index
        return None


def _reason_not_reproducible(config: dict) -> str | None:
    if config.get("normalizer") is not None:
        return f"it has a normalizer ({config['normalizer'].get('type')})"
    pre = config.get("pre_tokenizer") or {}
    if pre.get("type") != "ByteLevel":
        return f"its pre-tokenizer is {pre.get('type')}, not ByteLevel"
    if pre.get("add_prefix_space", False) or not pre.get("use_regex", True):
        return "its ByteLevel pre-tokenizer adds a prefix space or does not split with the GPT-2 regex"
    if config.get("padding") is not None or config.get("truncation") is not None:
        return "it pads or truncates"
    model = config.get("model") or {}
    if model.get("type") != "BPE":
        return f"its model is {model.get('type')}, not BPE"
    if model.get("dropout") not in (None, 0, 0.0):
        return "its BPE has dropout"
    if model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        return "its BPE has a subword prefix or suffix"
    if model.get("byte_fallback") or model.get("ignore_merges"):
        return "its BPE uses byte fallback or ignores merges"
    return None


def build_fast_bpe(tokenizer) -> tuple[FastByteLevelBPE | None, str]:
    """(fast encoder, description) for an HF ``tokenizers.Tokenizer``, or (None, why not)."""
    try:
        import tiktoken
    except ImportError:
        return None, "tiktoken is not installed"
    config = json.loads(tokenizer.to_str())
    reason = _reason_not_reproducible(config)
    if reason:
        return None, reason
    model = config["model"]
    vocab: dict[str, int] = model["vocab"]
    merges = [tuple(merge) if isinstance(merge, list) else tuple(merge.split(" ", 1)) for merge in model["merges"]]
    to_byte = {character: byte for byte, character in bytes_to_unicode().items()}
    if any(character not in vocab for character in to_byte):
        return None, "its vocabulary lacks some of the 256 byte symbols"
    merge_rank: dict[str, int] = {}
    for rank, (left, right) in enumerate(merges):
        merged = left + right
        if merged in merge_rank:
            return None, f"two merges produce the token {merged!r}"
        merge_rank[merged] = rank
    if any(token not in vocab for token in merge_rank):
        return None, "a merge produces a token missing from the vocabulary"
    # Tokens HF's BPE reproduces from their own bytes (see the module docstring); the others are left out.
    bpe = tokenizer.model
    reproducible = [token for token in merge_rank if [piece.value for piece in bpe.tokenize(token)] == [token]]
    excluded = len(merge_rank) - len(reproducible)
    ordered = sorted(reproducible, key=merge_rank.__getitem__)
    merged_ids = np.array([vocab[token] for token in ordered], dtype=np.int64)
    byte_ids = {byte: vocab[character] for character, byte in to_byte.items()}
    if np.all(np.diff(merged_ids) > 0) and len(set(byte_ids.values()) | set(merged_ids.tolist())) == len(
            byte_ids) + len(merged_ids):
        rank_to_id = None  # the HF ids already rank merged tokens by merge order: use them as tiktoken ranks
        ranks = {bytes([byte]): token_id for byte, token_id in byte_ids.items()}
        ranks.update({bytes(to_byte[c] for c in token): vocab[token] for token in ordered})
    else:
        ranks = {bytes([byte]): byte for byte in range(256)}
        ranks.update({bytes(to_byte[c] for c in token): 256 + index for index, token in enumerate(ordered)})
        rank_to_id = np.empty(256 + len(ordered), dtype=np.uint32)
        rank_to_id[:256] = [byte_ids[byte] for byte in range(256)]
        rank_to_id[256:] = merged_ids
    if len(ranks) != 256 + len(ordered):
        return None, "two vocabulary tokens have the same bytes"
    try:
        encoding = tiktoken.Encoding("pipeline-byte-level-bpe", pat_str=BYTE_LEVEL_PATTERN, mergeable_ranks=ranks,
                                     special_tokens={})
    except Exception as error:  # a tiktoken that rejects these ranks: stay with HF
        return None, f"tiktoken rejected the vocabulary ({error})"
    added = tuple(sorted({token["content"] for token in config.get("added_tokens") or [] if token["content"]}))
    description = f"tiktoken {tiktoken.__version__} exact byte-level BPE ({len(ordered)} merges"
    description += f", {excluded} unreachable tokens left out)" if excluded else ")"
    if not hasattr(getattr(encoding, "_core_bpe", None), "encode_ordinary"):  # not the pinned tiktoken's layout
        return None, f"tiktoken {tiktoken.__version__} lacks the Rust encode_ordinary this path calls"
    return FastByteLevelBPE(tokenizer, encoding, rank_to_id, added, excluded), description
