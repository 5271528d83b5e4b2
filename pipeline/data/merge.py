"""Join preprocessed datasets -- the shards of ``python -m pipeline preprocess --shard I/N`` -- into one:

    python -m pipeline merge --output-prefix data/web --shards 64      # data/web-shard-000{00..63}-of-00064
    python -m pipeline merge --output-prefix data/all --input data/a data/b

Each split is the concatenation, in the order given, of the inputs' splits, written with megatron-core's
``IndexedDatasetBuilder.add_index`` (the .bin bytes are copied, the indices offset). Every input must have been
tokenized with the same tokenizer (same tokenizer.json fingerprint, vocabulary, special tokens and dtype), and
``--shards N`` must find each of the N shards exactly once. Shards are joined in shard order whatever the order
given, and must agree on the valid fraction, the seed and the split rule: their merge is then the dataset one
preprocessing run over all the inputs writes (same documents, same order, same train/valid split; see
``pipeline.data.preprocess``). The output is published like a preprocessing run
(``pipeline.data.preprocess.publish_dataset``: complete or not at all).
"""

from __future__ import annotations

import argparse
import glob
import json
from pathlib import Path
from typing import Sequence

import numpy as np

from pipeline.data.meta import META_FORMAT_VERSION, SPLITS, import_indexed_dataset_module, load_meta, split_prefix
from pipeline.data.preprocess import _output_prefix, publish_dataset, shard_prefix, warn_if_valid_empty
from pipeline.errors import DataError, exit_on_data_error
from pipeline.io import naming_path

# Recorded per input and required to agree: what makes two datasets' ids mean the same tokens.
_TOKENIZATION_KEYS = ("tokenizer.sha256", "tokenizer.vocab_size", "special_tokens", "dtype")


def _tokenization(meta: dict) -> dict:
    return {"tokenizer.sha256": meta["tokenizer"]["sha256"], "tokenizer.vocab_size": meta["tokenizer"]["vocab_size"],
            "special_tokens": meta["special_tokens"], "dtype": meta["dtype"]}


def check_same_tokenization(prefixes: Sequence[str], metas: Sequence[dict]) -> None:
    """DataError naming the first input whose tokenization differs from the first input's."""
    reference = _tokenization(metas[0])
    for prefix, meta in zip(prefixes[1:], metas[1:]):
        current = _tokenization(meta)
        for key in _TOKENIZATION_KEYS:
            if current[key] != reference[key]:
                raise DataError(f"{prefix}.meta.json: made with a different tokenizer than {prefixes[0]} ({key} "
                                f"{current[key]} vs {reference[key]}); preprocess every shard with the same "
                                "tokenizer.json")


def _check_same_split(prefixes: Sequence[str], metas: Sequence[dict]) -> None:
    """DataError naming the first shard whose train/valid split rule differs from shard 0's: merged, such shards
    would not hold the split of one run."""
    for key in ("valid_fraction", "seed", "valid_assignment"):
        for prefix, meta in zip(prefixes[1:], metas[1:]):
            if meta.get(key) != metas[0].get(key):
                raise DataError(f"{prefix}.meta.json: {key} {meta.get(key)!r} differs from {prefixes[0]}'s "
                                f"{metas[0].get(key)!r}; preprocess every shard with the same --valid-fraction and "
                                "--seed (and the same version of the pipeline)")


def shard_inputs_of(output_prefix: str, count: int) -> list[str]:
    """The N shard prefixes of ``preprocess --shard I/N --output-prefix output_prefix``; DataError when one is
    missing."""
    prefixes = [shard_prefix(output_prefix, index, count) for index in range(count)]
    missing = [prefix for prefix in prefixes if not Path(f"{prefix}.meta.json").is_file()]
    if missing:
        raise DataError(f"{missing[0]}.meta.json: shard missing ({len(missing)} of {count} shards not written: "
                        "did every array task finish?)")
    return prefixes


def _expand(inputs: Sequence[str]) -> list[str]:
    prefixes = []
    for item in inputs:
        if glob.has_magic(item):  # a glob over meta files names the prefixes
            matches = sorted(glob.glob(f"{item}.meta.json"))
            if not matches:
                raise DataError(f"{item}: no dataset matches this pattern")
            prefixes += [match[:-len(".meta.json")] for match in matches]
        else:
            prefixes.append(item)
    return prefixes


def merge(inputs: Sequence[str], output_prefix: str) -> dict:
    """Writes the merged dataset at ``output_prefix``; returns its meta.json content."""
    prefixes = _expand(inputs)
    if not prefixes:
        raise DataError("merge: no input datasets given")
    prefix = _output_prefix(output_prefix)
    if str(prefix) in prefixes:
        raise DataError(f"{prefix}: the merge output is also one of its inputs")
    metas = [load_meta(item) for item in prefixes]
    check_same_tokenization(prefixes, metas)
    shards = [tuple(meta["shard"]) for meta in metas if "shard" in meta]
    if shards and (len(shards) != len(metas) or sorted(shards) != [(i, len(shards)) for i in range(len(shards))]):
        listed = ", ".join(f"{item} ({'/'.join(map(str, meta.get('shard', ['-'])))})"
                           for item, meta in zip(prefixes, metas))
        raise DataError(f"merge: the inputs are not shards 0..N-1 of one run, each once: {listed}")
    if shards:
        # Shard order is the single run's document order, whatever order the inputs were given in.
        prefixes, metas = map(list, zip(*sorted(zip(prefixes, metas), key=lambda pair: pair[1]["shard"][0])))
        _check_same_split(prefixes, metas)

    def write(staging: Path) -> dict:
        IndexedDatasetBuilder = import_indexed_dataset_module().IndexedDatasetBuilder
        dtype = metas[0]["dtype"]
        counts = {}
        for split in SPLITS:
            target = staging / Path(split_prefix(prefix, split)).name
            with naming_path(f"{target}.bin"):
                builder = IndexedDatasetBuilder(f"{target}.bin", dtype=np.dtype(dtype).type)
                for item, meta in zip(prefixes, metas):
                    if meta["splits"][split]["documents"]:  # megatron-core cannot open an empty split
                        builder.add_index(split_prefix(item, split))
            with naming_path(f"{target}.idx"):
                builder.finalize(f"{target}.idx")
            counts[split] = {key: sum(meta["splits"][split][key] for meta in metas) for key in ("documents", "tokens")}
        first = metas[0]
        meta = {
            "format_version": META_FORMAT_VERSION,
            "tokenizer": first["tokenizer"],
            "special_tokens": first["special_tokens"],
            "dtype": first["dtype"],
            "max_token_id": max(meta["max_token_id"] for meta in metas),
            "valid_fraction": first["valid_fraction"],
            "seed": first["seed"],
            **({"valid_assignment": first["valid_assignment"]} if "valid_assignment" in first else {}),
            "splits": counts,
            "documents": counts["train"]["documents"] + counts["valid"]["documents"],
            "tokens": counts["train"]["tokens"] + counts["valid"]["tokens"],
            "empty_documents_skipped": sum(meta["empty_documents_skipped"] for meta in metas),
            "invalid_utf8_replaced": sum(meta["invalid_utf8_replaced"] for meta in metas),
            "text_bytes": sum(meta["text_bytes"] for meta in metas),
            "sources": [source for meta in metas for source in meta["sources"]],
            "merged_from": [str(Path(item).resolve()) for item in prefixes],
        }
        meta_file = staging / f"{prefix.name}.meta.json"
        with naming_path(meta_file):
            meta_file.write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        return meta

    meta = publish_dataset(prefix, write)
    warn_if_valid_empty(prefix, meta)  # shards keep an empty valid draw (a whole run would move one document)
    return meta


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipeline merge", description=__doc__.splitlines()[0])
    parser.add_argument("--output-prefix", required=True, help="the merged dataset's prefix")
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--shards", type=int, metavar="N",
                       help="merge OUTPUT_PREFIX-shard-*-of-N (written by preprocess --shard I/N)")
    group.add_argument("--input", nargs="+", help="dataset prefixes (or globs) to concatenate, in this order")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.shards is not None and args.shards < 1:
        raise DataError(f"--shards must be >= 1, got {args.shards}")
    inputs = shard_inputs_of(args.output_prefix, args.shards) if args.shards is not None else args.input
    meta = merge(inputs, args.output_prefix)
    splits = meta["splits"]
    print(f"merged {len(meta['merged_from'])} datasets into {args.output_prefix}: train {splits['train']['documents']} "
          f"documents / {splits['train']['tokens']} tokens, valid {splits['valid']['documents']} documents / "
          f"{splits['valid']['tokens']} tokens")
    return 0


if __name__ == "__main__":
    exit_on_data_error(main)
