"""Synthetic megatron-core indexed datasets of random tokens, written directly with the builder (no tokenizer):
the corpus-scale benchmark (bench/data.py) and tests measure the index and loader on 10M-1B tokens with them."""

from __future__ import annotations

import os

import numpy as np

from pipeline.data.meta import import_indexed_dataset_module


def write_synthetic_split(path_prefix: str | os.PathLike, tokens: int, vocab_size: int = 1000,
                          mean_document_tokens: int = 500, seed: int = 0, first_id: int = 5,
                          block_tokens: int = 1 << 24) -> int:
    """Writes ``path_prefix``.bin/.idx holding ``tokens`` random ids in [first_id, vocab_size) (ids below
    ``first_id`` are left to special tokens), one sequence per document, document lengths drawn geometrically
    around ``mean_document_tokens``; returns the number of documents. Memory stays O(block_tokens + documents)."""
    from pipeline.data.preprocess import add_documents

    builder_class = import_indexed_dataset_module().IndexedDatasetBuilder
    dtype = np.uint16 if vocab_size < 65500 else np.int32
    rng = np.random.default_rng(seed)
    builder = builder_class(f"{path_prefix}.bin", dtype=dtype)
    documents, written = 0, 0
    while written < tokens:
        size = min(block_tokens, tokens - written)
        lengths = rng.geometric(1.0 / mean_document_tokens, size=size // mean_document_tokens * 2 + 2)
        ends = np.cumsum(lengths)
        count = int(np.searchsorted(ends, size)) + 1
        lengths = lengths[:count]
        lengths[-1] = size - (int(ends[count - 2]) if count > 1 else 0)  # the block ends with a whole document
        flat = rng.integers(first_id, vocab_size, size=size, dtype=dtype)
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        add_documents(builder, flat, offsets, lengths, np.arange(count))
        documents += count
        written += size
    builder.finalize(f"{path_prefix}.idx")
    return documents
