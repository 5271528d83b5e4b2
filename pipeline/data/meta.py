"""The on-disk dataset contract: split file names, ``PREFIX.meta.json`` (tokenizer hash, special ids, counts),
and megatron-core's indexed-dataset module that reads and writes the ``.bin``/``.idx`` pairs."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np

from pipeline.data.tokenizer import load_raw_tokenizer, resolve_tokenizer_file, special_tokens, tokenizer_fingerprint
from pipeline.errors import DataError
from pipeline.io import read_json_object

META_FORMAT_VERSION = 1
SPLITS = ("train", "valid")


def import_indexed_dataset_module():
    """megatron-core's ``indexed_dataset`` module, without the optimizer warnings its package import prints on
    machines without Transformer Engine / Apex (irrelevant to reading and writing datasets)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")
        from megatron.core.datasets import indexed_dataset
    return indexed_dataset


def token_dtype(vocab_size: int) -> type[np.number]:
    """Smallest id dtype megatron-core's IndexedDataset supports for this vocabulary (its own rule)."""
    return np.uint16 if vocab_size < 65500 else np.int32


def split_prefix(prefix: str | os.PathLike, split: str) -> str:
    """``PREFIX_train`` / ``PREFIX_valid``: the path prefix of one split's .bin/.idx pair."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return f"{prefix}_{split}"


def meta_path(prefix: str | os.PathLike) -> Path:
    return Path(f"{prefix}.meta.json")


def dataset_dir(prefix: str | os.PathLike) -> Path:
    """``PREFIX.dataset/``: the directory that holds the dataset's files; the names at ``PREFIX`` (``PREFIX_train.bin``
    ..., ``PREFIX.meta.json``) are relative symlinks into it, so replacing the directory in one rename replaces
    the whole dataset at once (``pipeline.io.publish_directory``)."""
    return Path(f"{prefix}.dataset")


def dataset_file_names(prefix: str | os.PathLike) -> list[str]:
    """The base names of a dataset's files: both splits' .bin/.idx and meta.json, meta.json last."""
    name = Path(prefix).name
    return [f"{name}_{split}{ext}" for split in SPLITS for ext in (".bin", ".idx")] + [f"{name}.meta.json"]



def load_meta(prefix: str | os.PathLike) -> dict:
    """The meta.json written next to a preprocessed dataset; DataError if missing or unreadable."""
    path = meta_path(prefix)
    if not path.is_file():
        raise DataError(f"{path}: dataset metadata not found (was {prefix} written by python -m pipeline preprocess?)")
    meta = read_json_object(path, "dataset metadata file")
    if meta.get("format_version") != META_FORMAT_VERSION:
        raise DataError(f"{path}: unsupported metadata format (expected format_version {META_FORMAT_VERSION})")
    return meta


def check_meta_matches_tokenizer(prefix: str | os.PathLike, tokenizer_path: str | os.PathLike,
                                 check_fingerprint: bool = True) -> dict:
    """Raises DataError if the dataset at ``prefix`` was tokenized with another vocabulary (size, special ids
    or, with ``check_fingerprint``, a different tokenizer.json); returns the metadata."""
    meta = load_meta(prefix)
    tokenizer_file = resolve_tokenizer_file(tokenizer_path)
    tokenizer = load_raw_tokenizer(tokenizer_file)
    path = meta_path(prefix)
    recorded = meta["tokenizer"]
    if recorded["vocab_size"] != tokenizer.get_vocab_size():
        raise DataError(f"{path}: dataset vocab size {recorded['vocab_size']} differs from tokenizer "
                        f"{tokenizer_file} ({tokenizer.get_vocab_size()})")
    special = special_tokens(tokenizer)
    actual = {"bos": special.bos, "pad": special.pad, "eos": special.eos, "unk": special.unk, "mask": special.mask}
    if meta["special_tokens"] != actual:
        raise DataError(f"{path}: dataset special token ids {meta['special_tokens']} differ from tokenizer "
                        f"{tokenizer_file} ({actual})")
    if check_fingerprint and recorded["sha256"] != tokenizer_fingerprint(tokenizer_file):
        raise DataError(f"{path}: dataset was tokenized with a different tokenizer.json than {tokenizer_file} "
                        f"(sha256 {recorded['sha256'][:12]}... vs {tokenizer_fingerprint(tokenizer_file)[:12]}...)")
    return meta
