"""Tokenize a corpus into megatron-core indexed datasets: ``PREFIX_{train,valid}.{bin,idx}`` + ``PREFIX.meta.json``.

    python -m pipeline preprocess --input corpus/*.txt --tokenizer tok/tokenizer.json --output-prefix data/wiki \
        --valid-fraction 0.01 --workers 8

Inputs (chosen by extension, or ``--format``): plain text (documents separated by blank lines, or one per line
with ``--one-doc-per-line``; ``.gz``/``.xz``/``.bz2`` are decompressed on the fly), JSONL (``--text-key``),
Parquet (``--text-key``) and directories written by HF ``datasets.save_to_disk``. Each document is one sequence
(and one document) of the indexed dataset, without special tokens: packing adds ``<s>``/``</s>``
(``pipeline.data.dataset``). Token ids are stored as uint16 when the vocabulary allows it, else int32.

Documents are tokenized in worker processes with ``tiktoken`` when ``pipeline.data.fast_bpe`` can reproduce the
tokenizer's ids exactly (byte-level BPE without normalizer: what ``pipeline.data.tokenizer`` writes; about 5x faster),
else with HF ``tokenizers``; one line on stderr says which and why. The first documents are checked against HF
tokenizers (a mismatch falls back to it), and so is one document of every 4th chunk throughout the run, in the
workers (a mismatch stops with a DataError naming the file and document). ``--no-fast-tokenizer`` forces HF
tokenizers. The ids are appended to a temporary token file, then split into train and valid *by documents* and
written with megatron-core's ``IndexedDatasetBuilder``.

The split is a function of each document and ``--seed`` alone (``valid_document_hashes``): a document is held out
when the 64-bit BLAKE2b hash of its token ids, keyed by the seed, is below ``fraction * 2**64``. So the shards of
``--shard I/N``, merged, hold exactly the train and valid documents of one run over the same inputs, and duplicate
documents land in the same split. The number of valid documents is Binomial(n, fraction): ``fraction * n`` within
``3 * sqrt(n * fraction * (1 - fraction))`` for 99.7% of corpora (±0.3% of it at 10M documents and 1%, ±17% at
300 documents and 10%). A whole run (not a shard) whose draw leaves one split empty moves the document with the
smallest (largest) hash, so both splits are non-empty whenever fraction > 0 and there are >= 2 documents; only
then, with a chance of (1 - fraction)**n, a merge of shards differs from a single run (the merge warns).

Publication (issue 14): the dataset's five files are written into a staging directory ``.NAME.dataset.tmp-PID``
next to the prefix and published in one rename as ``PREFIX.dataset/`` (``pipeline.io.publish_directory``); the
names ``PREFIX_train.bin`` ... ``PREFIX.meta.json`` are relative symlinks into it, made once. So a dataset appears
complete or not at all, an existing one survives any failure (or ``kill -9``) of the run replacing it, a reader
sees either the old or the new dataset, and the next run removes a killed run's staging directory. A dataset of
plain files (written before this layout) is adopted first by hard links, without a moment where a name is
missing. The largest token id is recorded in meta.json (``max_token_id``) and checked where the data is opened.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import multiprocessing
import os
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from pipeline.data.corpus import FORMATS, DocumentReader, detect_format, expand_inputs
from pipeline.data.fast_bpe import FastByteLevelBPE, build_fast_bpe
from pipeline.data.meta import (META_FORMAT_VERSION, SPLITS, dataset_dir, dataset_file_names,
                                import_indexed_dataset_module, split_prefix, token_dtype)
from pipeline.data.tokenizer import load_raw_tokenizer, resolve_tokenizer_file, special_tokens, tokenizer_fingerprint
from pipeline.errors import DataError, exit_on_data_error
from pipeline.io import (link_atomic, make_staging_dir, naming_path, process_running, publish_directory,
                         sweep_leftovers)


# ----------------------------------------------------------------------------------------------------------------
# Tokenizing (in worker processes)

_worker_tokenizer = None
_worker_fast: FastByteLevelBPE | None = None
_worker_dtype = None
_worker_seed = 0
# The fast encoder preprocess() built and checked, by tokenizer file: forked workers inherit it (no rebuild).
_prepared_fast: dict[str, FastByteLevelBPE] = {}


def _init_worker(tokenizer_file: str, dtype_name: str, use_fast: bool = False, seed: int = 0) -> None:
    global _worker_tokenizer, _worker_fast, _worker_dtype, _worker_seed
    _worker_seed = seed
    _worker_fast = None
    if use_fast:
        _worker_fast = _prepared_fast.get(tokenizer_file)
        if _worker_fast is None:  # a spawned worker: build it again (deterministic, same checks)
            _worker_fast, _ = build_fast_bpe(load_raw_tokenizer(tokenizer_file))
    _worker_tokenizer = _worker_fast.tokenizer if _worker_fast is not None else load_raw_tokenizer(tokenizer_file)
    _worker_dtype = np.dtype(dtype_name)


# Byte-level BPE pre-tokenizes with GPT-2's regex, and no pre-token spans a newline or a single space that sits
# between two printable ASCII characters. Cutting a long document there therefore gives exactly the ids of
# tokenizing it whole, while HF tokenizers is about twice as fast on pieces of ~10 KB as on megabyte strings.
_PIECE_CHARS = 8192
_SAFE_CUT = re.compile(r"(?<=[!-~]\n)(?=[!-~])|(?<=[!-~])(?= [!-~])")


def split_for_tokenization(document: str, piece_chars: int = _PIECE_CHARS) -> list[str]:
    """``document`` cut into pieces of about ``piece_chars`` characters at places that do not change its ids."""
    if len(document) <= 2 * piece_chars:
        return [document]
    pieces, start = [], 0
    while len(document) - start > 2 * piece_chars:
        cut = _SAFE_CUT.search(document, start + piece_chars)
        if cut is None:
            break
        pieces.append(document[start:cut.start()])
        start = cut.start()
    pieces.append(document[start:])
    return pieces


def _tokenize_chunk(documents: list[str], check: tuple[int, str] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """All token ids of the chunk concatenated, and each document's length (one pickle per chunk, not per doc).
    ``check`` = (position in the chunk, "FILE: document N"): on the fast path, that document's first piece is also
    encoded by HF tokenizers and must give the same ids (DataError naming the document otherwise)."""
    pieces, pieces_per_document = [], []
    for document in documents:
        split = split_for_tokenization(document)
        pieces.extend(split)
        pieces_per_document.append(len(split))
    if _worker_fast is not None:
        piece_ids = _worker_fast.encode_batch(pieces)
        if check is not None:
            position, label = check
            # The document's start, cut where the ids do not change (so ~1-2k characters are checked, not 16k).
            checked = split_for_tokenization(documents[position], _CHECK_CHARS)[0]
            if _worker_fast.encode_batch([checked])[0] != _worker_tokenizer.encode(checked,
                                                                                  add_special_tokens=False).ids:
                raise DataError(f"{label}: the tiktoken fast path gave other ids than HF tokenizers on "
                                f"{checked[:40]!r}; rerun with --no-fast-tokenizer (and please report it)")
    else:
        piece_ids = [encoding.ids for encoding in _worker_tokenizer.encode_batch(pieces, add_special_tokens=False)]
    piece_lengths = np.fromiter(map(len, piece_ids), dtype=np.int64, count=len(piece_ids))
    tokens = np.array(list(itertools.chain.from_iterable(piece_ids)), dtype=_worker_dtype)
    if len(pieces) == len(documents):
        return tokens, piece_lengths
    document_starts = np.concatenate([[0], np.cumsum(pieces_per_document)[:-1]])
    return tokens, np.add.reduceat(piece_lengths, document_starts)


# The sampled check in the workers: the first _CHECK_CHARS..2*_CHECK_CHARS characters of one document in every
# _CHECK_EVERY-th chunk are also encoded by HF tokenizers. One check costs ~0.3-0.7 ms here (mostly HF's per-call
# overhead), a chunk of 256 short documents ~8 ms to tokenize: checking every 4th chunk costs about 1-2%.
_CHECK_CHARS = 1024
_CHECK_EVERY = 4


def _tokenize_task(task: tuple[list[str], tuple[int, str] | None]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids, document lengths, document hashes) of one chunk: the hashes are computed here, in parallel."""
    tokens, lengths = _tokenize_chunk(*task)
    return tokens, lengths, valid_document_hashes(tokens, lengths, _worker_seed)


def valid_document_hashes(tokens: np.ndarray, lengths: np.ndarray, seed: int) -> np.ndarray:
    """Per document (``lengths`` consecutive runs of ``tokens``): the 64-bit BLAKE2b hash of its ids as
    little-endian uint32, keyed by ``seed``, as uint64. Independent of the dtype the ids are stored in, of the
    chunk, the shard and the run: the document's split (``valid_document_mask``) depends on nothing else."""
    data = memoryview(np.ascontiguousarray(tokens, dtype="<u4")).cast("B")
    key = int(seed).to_bytes(8, "little", signed=True)
    ends = np.cumsum(lengths, dtype=np.int64) * 4
    starts = ends - np.asarray(lengths, dtype=np.int64) * 4
    return np.fromiter((int.from_bytes(hashlib.blake2b(data[start:end], digest_size=8, key=key).digest(), "little")
                        for start, end in zip(starts.tolist(), ends.tolist())), dtype=np.uint64, count=len(lengths))


def _chunks(documents: Iterator[str], max_documents: int = 256, max_chars: int = 1 << 20) -> Iterator[list[str]]:
    chunk, chars = [], 0
    for document in documents:
        chunk.append(document)
        chars += len(document)
        if len(chunk) >= max_documents or chars >= max_chars:
            yield chunk
            chunk, chars = [], 0
    if chunk:
        yield chunk


def _checked_tasks(reader: DocumentReader) -> Iterator[tuple[list[str], tuple[int, str] | None]]:
    """(chunk, check) for the workers: one document of every ``_CHECK_EVERY``-th chunk (at position ``chunk number
    % chunk size``, so the checked documents spread over the run deterministically) is compared with HF
    tokenizers on the fast path: its first 1-2k characters. The labels come from the reader's position, recorded
    as each document is read."""
    labels: list[tuple[Path, int]] = []
    documents = reader.documents_with_positions()

    def texts():
        for text, position in documents:
            labels.append(position)
            yield text

    for number, chunk in enumerate(_chunks(texts())):
        chunk_labels, labels[:] = labels[:len(chunk)], labels[len(chunk):]
        if number % _CHECK_EVERY:
            yield chunk, None
            continue
        position = number % len(chunk)
        path, index = chunk_labels[position]
        yield chunk, (position, f"{path}: document {index}")


# The fast path's runtime guard: the first documents' ids (up to this many characters) are compared with HF's.
_GUARD_CHARS = 100_000


def _choose_fast_encoder(tokenizer, first_chunk: list[str] | None, enabled: bool
                         ) -> tuple[FastByteLevelBPE | None, str]:
    """(tiktoken fast encoder or None, a line saying which engine tokenizes and why)."""
    if not enabled:
        return None, "tokenizing with HF tokenizers (fast path disabled)"
    fast, description = build_fast_bpe(tokenizer)
    if fast is None:
        return None, f"tokenizing with HF tokenizers: no exact tiktoken fast path because {description}"
    sample, chars = [], 0
    for document in first_chunk or []:
        for piece in split_for_tokenization(document):
            if chars >= _GUARD_CHARS:
                break
            sample.append(piece)
            chars += len(piece)
    mismatch = fast.first_mismatch(sample)
    if mismatch is not None:
        return None, ("tokenizing with HF tokenizers: the tiktoken fast path gave other ids than HF tokenizers on "
                      f"{sample[mismatch][:60]!r}")
    return fast, f"tokenizing with {description}"


# ----------------------------------------------------------------------------------------------------------------
# Preprocessing


@dataclass
class PreprocessConfig:
    """One preprocessing run."""

    inputs: Sequence[str | os.PathLike]
    """Input files, globs or saved HF dataset directories."""
    tokenizer: str | os.PathLike
    """tokenizer.json (or a directory holding one)."""
    output_prefix: str | os.PathLike
    """Writes OUTPUT_PREFIX_train.{bin,idx}, OUTPUT_PREFIX_valid.{bin,idx} and OUTPUT_PREFIX.meta.json (symlinks
    into the directory OUTPUT_PREFIX.dataset/, which holds the files and is replaced in one rename)."""
    input_format: str = "auto"
    """auto (by extension) | text | jsonl | parquet | hf."""
    text_key: str = "text"
    """JSON field / column holding the document text (JSONL, Parquet, HF datasets)."""
    one_doc_per_line: bool = False
    """Plain text: every line is a document (default: documents are separated by blank lines)."""
    valid_fraction: float = 0.01
    """Fraction of documents held out for validation: each with this probability, by a hash of its ids and the seed
    (the module docstring); >= 1 valid and >= 1 train document when > 0 and there are >= 2 documents."""
    seed: int = 1234
    """Keys the hash that chooses the validation documents."""
    workers: int = 1
    """Tokenizer processes; 1 tokenizes in this process."""
    replace_invalid: bool = False
    """Replace invalid UTF-8 with U+FFFD (counted, warned) instead of failing."""
    fast_tokenizer: bool = True
    """Encode with tiktoken when it provably gives the same ids as HF tokenizers (``pipeline.data.fast_bpe``; about 5x
    faster), else with HF tokenizers."""
    show_progress: bool = True
    shard: tuple[int, int] | None = None
    """(I, N): tokenize only shard I of N of the inputs (contiguous runs of input files) into
    ``shard_prefix(output_prefix, I, N)``; ``pipeline.data.merge`` joins the N shards into the dataset one run
    writes (same documents in the same splits and order)."""

    def __post_init__(self):
        if self.shard is not None and not (self.shard[1] >= 1 and 0 <= self.shard[0] < self.shard[1]):
            raise ValueError(f"shard must be I/N with 0 <= I < N, got {self.shard[0]}/{self.shard[1]}")
        if self.input_format not in FORMATS:
            raise ValueError(f"input_format must be one of {FORMATS}, got {self.input_format!r}")
        if not (0.0 <= self.valid_fraction < 1.0):
            raise ValueError(f"valid_fraction must be in [0, 1), got {self.valid_fraction}")
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")
        if not self.text_key:
            raise ValueError("text_key must not be empty")


def add_documents(builder, flat: np.ndarray, offsets: np.ndarray, document_lengths: np.ndarray,
                  documents: np.ndarray, max_block_tokens: int = 1 << 24) -> None:
    """``builder.add_document(flat[offsets[d]:offsets[d + 1]], [document_lengths[d]])`` for each of ``documents``
    (increasing), in bulk: one write per run of consecutive documents instead of a call per document, which cost
    more than tokenizing with tiktoken for corpora of short documents. The same .bin/.idx bytes."""
    if builder.multimodal:
        raise ValueError("add_documents writes text-only datasets")
    if documents.size == 0:
        return
    run_breaks = np.flatnonzero(np.diff(documents) != 1) + 1
    run_firsts = documents[np.concatenate([[0], run_breaks])]
    run_lasts = documents[np.concatenate([run_breaks - 1, [documents.size - 1]])]
    for first, last in zip(run_firsts.tolist(), run_lasts.tolist()):
        for start in range(int(offsets[first]), int(offsets[last + 1]), max_block_tokens):
            end = min(start + max_block_tokens, int(offsets[last + 1]))
            builder.data_file.write(np.ascontiguousarray(flat[start:end], dtype=builder.dtype).tobytes())
    # Each document is one sequence: its length, and a document boundary after it.
    count = len(builder.sequence_lengths)
    builder.sequence_lengths.extend(document_lengths[documents].tolist())
    builder.document_indices.extend(range(count + 1, count + documents.size + 1))


def shard_prefix(prefix: str | os.PathLike, index: int, count: int) -> str:
    """Where ``--shard index/count`` writes: PREFIX-shard-0000I-of-0000N."""
    return f"{prefix}-shard-{index:05d}-of-{count:05d}"


def shard_inputs(inputs: list[Path], index: int, count: int) -> list[Path]:
    """Shard ``index`` of ``count``: a contiguous run of the (sorted, expanded) input files, so the shards in
    order hold the documents of one run in the same order. DataError when there are fewer files than shards."""
    if len(inputs) < count:
        raise DataError(f"--shard {index}/{count}: only {len(inputs)} input files ({inputs[0]} ...); a shard is a "
                        "set of whole files: split the corpus into at least as many files as shards")
    bounds = np.linspace(0, len(inputs), count + 1).round().astype(int)
    return inputs[bounds[index]:bounds[index + 1]]


# Recorded in meta.json; merge requires its shards to agree on it (and on seed and fraction).
VALID_ASSIGNMENT = "blake2b-64(key=seed, token ids as uint32 LE) < fraction * 2**64"


def warn_if_valid_empty(prefix, meta: dict) -> None:
    """One warning line on stderr when a published dataset (preprocessed or merged) has no valid document."""
    if meta["splits"]["valid"]["documents"] == 0:
        print(f"warning: {split_prefix(prefix, 'valid')}: the valid split is empty (--valid-fraction "
              f"{meta['valid_fraction']}, {meta['documents']} documents); train with --eval-interval 0",
              file=sys.stderr)


def valid_document_mask(hashes: np.ndarray, non_empty: np.ndarray, valid_fraction: float,
                        keep_both_splits: bool) -> np.ndarray:
    """Which documents go to valid: those (non-empty) whose hash is below ``valid_fraction * 2**64``. With
    ``keep_both_splits`` (a whole run, not a shard), a draw that leaves valid (train) empty moves the document with
    the smallest (largest) hash, so both splits are non-empty when fraction > 0 and there are >= 2 documents."""
    threshold = np.uint64(int(valid_fraction * 2.0 ** 64))  # exact: fraction < 1, scaling by 2**64 is exact
    is_valid = (hashes < threshold) & non_empty
    candidates = np.flatnonzero(non_empty)
    if keep_both_splits and valid_fraction > 0 and candidates.size >= 2:
        if not is_valid.any():
            is_valid[candidates[np.argmin(hashes[candidates])]] = True
        elif is_valid[candidates].all():
            is_valid[candidates[np.argmax(hashes[candidates])]] = False
    return is_valid


def _output_prefix(value: str | os.PathLike) -> Path:
    """The output prefix as a path; DataError when it names a directory (``DIR/`` would write ``DIR_train.bin``)."""
    text = os.fspath(value)
    if not text or text.endswith(("/", os.sep)) or (Path(text).is_dir() and not Path(text).is_symlink()):
        example = Path(text or ".") / "corpus"
        raise DataError(f"{text}: --output-prefix names a directory; give the dataset a name inside it, e.g. "
                        f"{example}")
    return Path(text)


def _make_parents(directory: Path) -> list[Path]:
    """mkdir -p; returns the directories it created (removed again if preprocessing fails)."""
    missing = []
    while not directory.exists():
        missing.append(directory)
        if directory.parent == directory:
            break
        directory = directory.parent
    for path in reversed(missing):
        with naming_path(path):
            path.mkdir()
    return missing


def _adopt_plain_files(prefix: Path) -> None:
    """A dataset written before PREFIX.dataset/ existed has plain files at PREFIX_*: hard-link them into a
    PREFIX.dataset/ of their own and replace each plain name with its symlink. Every name shows the same bytes at
    every moment, so the old dataset stays whole until the one rename that publishes the new one."""
    names = dataset_file_names(prefix)
    plain = [prefix.parent / name for name in names if (prefix.parent / name).is_file()
             and not (prefix.parent / name).is_symlink()]
    if not plain or os.path.lexists(dataset_dir(prefix)):
        return
    staging = make_staging_dir(dataset_dir(prefix))
    try:
        for path in plain:
            os.link(path, staging / path.name)
        publish_directory(staging, dataset_dir(prefix))
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    for path in plain:
        link_atomic(path, f"{dataset_dir(prefix).name}/{path.name}")


def _sweep_older_temporaries(prefix: Path) -> None:
    """Removes the per-file temporaries of dead processes: ``NAME.tmp-PID`` (as large as the output) that preprocess
    wrote before PREFIX.dataset/ existed, and ``.NAME.tmp-PID`` symlinks of a killed ``link_atomic``."""
    for name in [f"{prefix.name}.all.bin"] + dataset_file_names(prefix):
        for leftover in prefix.parent.glob(f"{name}.tmp-*"):
            pid = leftover.name.rsplit(".tmp-", 1)[1]
            if pid.isdigit() and not process_running(int(pid)):
                leftover.unlink(missing_ok=True)
        sweep_leftovers(prefix.parent / name)


def preprocess(config: PreprocessConfig) -> dict:
    """Runs one preprocessing job (see the module docstring); returns the meta.json content."""
    prefix = _output_prefix(config.output_prefix)
    inputs = expand_inputs(config.inputs)
    if config.shard is not None:
        inputs = shard_inputs(inputs, *config.shard)
        prefix = _output_prefix(shard_prefix(prefix, *config.shard))
    tokenizer_file = resolve_tokenizer_file(config.tokenizer)
    tokenizer = load_raw_tokenizer(tokenizer_file)
    meta = publish_dataset(prefix, lambda staging: _write_dataset(config, inputs, tokenizer_file, tokenizer, prefix,
                                                                  staging))
    warn_if_valid_empty(prefix, meta)
    if meta["invalid_utf8_replaced"]:
        files = ", ".join(f"{name} ({count})" for name, count in meta["invalid_utf8_by_file"].items())
        print(f"warning: replaced {meta['invalid_utf8_replaced']} invalid UTF-8 sequences with U+FFFD in "
              f"{files}", file=sys.stderr)
    del meta["invalid_utf8_by_file"]
    return meta


def publish_dataset(prefix: Path, write: Callable[[Path], dict]) -> dict:
    """``write(staging)`` fills a staging directory with the dataset's files and returns its meta; the directory is
    then published in one rename as PREFIX.dataset/ with the PREFIX_* symlinks (the module docstring), or removed
    on any failure. Returns what ``write`` returned."""
    created = _make_parents(prefix.parent)
    staging = None
    try:
        _sweep_older_temporaries(prefix)
        sweep_leftovers(dataset_dir(prefix))
        _adopt_plain_files(prefix)  # first: it uses the same staging name
        staging = make_staging_dir(dataset_dir(prefix))
        with naming_path(staging):
            meta = write(staging)
        publish_directory(staging, dataset_dir(prefix))
        staging = None
        for name in dataset_file_names(prefix):
            link_atomic(prefix.parent / name, f"{dataset_dir(prefix).name}/{name}")
    except BaseException:
        # Cleanup must not hide the first error (a read-only or full disk fails the cleanup too).
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        for directory in created:
            try:
                directory.rmdir()
            except OSError:
                pass
        raise
    # Packing indices cached by pipeline.data.dataset describe the replaced .idx files: drop them rather than let
    # them pile up (they are keyed by the .idx identity, so they would never be used again).
    for split in SPLITS:
        for stale in prefix.parent.glob(Path(split_prefix(prefix, split)).name + ".packed-L*.npy"):
            stale.unlink(missing_ok=True)
    return meta


def _write_dataset(config: PreprocessConfig, inputs: list[Path], tokenizer_file: Path, tokenizer, prefix: Path,
                   staging: Path) -> dict:
    """Tokenizes the inputs and writes the dataset's files into ``staging``; returns the meta.json content."""
    from tqdm import tqdm

    vocab_size = tokenizer.get_vocab_size()
    dtype = np.dtype(token_dtype(vocab_size))
    IndexedDatasetBuilder = import_indexed_dataset_module().IndexedDatasetBuilder
    reader = DocumentReader(inputs, config.input_format, config.text_key, config.one_doc_per_line,
                            config.replace_invalid)
    all_tokens_path = staging / "all-tokens.bin"
    try:
        # Pass 1: tokenize everything into one flat temporary file, keeping per-document lengths.
        lengths: list[np.ndarray] = []
        hashes: list[np.ndarray] = []
        max_token_id = -1
        progress = tqdm(desc=f"tokenizing -> {prefix.name}", unit="doc", disable=not config.show_progress,
                        file=sys.stderr, mininterval=1.0)
        tasks = _checked_tasks(reader)
        first_task = next(tasks, None) if config.fast_tokenizer else None
        if first_task is not None:
            tasks = itertools.chain([first_task], tasks)
        fast, engine_line = _choose_fast_encoder(tokenizer, first_task[0] if first_task else None,
                                                 config.fast_tokenizer)
        print(f"preprocess: {engine_line}", file=sys.stderr)
        if fast is not None:
            _prepared_fast[str(tokenizer_file)] = fast
        with open(all_tokens_path, "wb") as all_tokens:
            if config.workers == 1:
                _init_worker(str(tokenizer_file), dtype.name, fast is not None, config.seed)
                results = map(_tokenize_task, tasks)
                pool = None
            else:
                context = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")
                pool = context.Pool(config.workers, initializer=_init_worker,
                                    initargs=(str(tokenizer_file), dtype.name, fast is not None, config.seed))
                results = pool.imap(_tokenize_task, tasks, chunksize=1)
            try:
                for tokens, chunk_lengths, chunk_hashes in results:
                    with naming_path(all_tokens_path):
                        all_tokens.write(tokens.tobytes())
                    if tokens.size:
                        max_token_id = max(max_token_id, int(tokens.max()))
                    lengths.append(chunk_lengths)
                    hashes.append(chunk_hashes)
                    progress.update(chunk_lengths.size)
            finally:
                progress.close()  # before any error message, which then starts on its own line
                if pool is not None:
                    pool.terminate()
                    pool.join()
        document_lengths = np.concatenate(lengths) if lengths else np.zeros(0, dtype=np.int64)
        n_empty_tokenized = int(np.count_nonzero(document_lengths == 0))
        if reader.stats.documents - n_empty_tokenized == 0:
            names = ", ".join(str(path) for path in inputs)
            raise DataError(f"{names}: no non-empty documents ({reader.stats.empty_documents} empty skipped)")

        # Pass 2: split by documents and write both indexed datasets with megatron-core's builder.
        is_valid = valid_document_mask(np.concatenate(hashes) if hashes else np.zeros(0, np.uint64),
                                       document_lengths > 0, config.valid_fraction,
                                       keep_both_splits=config.shard is None)
        offsets = np.concatenate([[0], np.cumsum(document_lengths)])
        flat = np.memmap(all_tokens_path, dtype=dtype, mode="r") if offsets[-1] else np.zeros(0, dtype)
        counts = {}
        for split, selected in (("train", ~is_valid & (document_lengths > 0)), ("valid", is_valid)):
            split_path = staging / Path(split_prefix(prefix, split)).name
            with naming_path(f"{split_path}.bin"):
                builder = IndexedDatasetBuilder(f"{split_path}.bin", dtype=dtype.type)
                add_documents(builder, flat, offsets, document_lengths, np.flatnonzero(selected))
            with naming_path(f"{split_path}.idx"):
                builder.finalize(f"{split_path}.idx")
            counts[split] = {"documents": int(np.count_nonzero(selected)),
                             "tokens": int(document_lengths[selected].sum())}
        del flat
    finally:
        _prepared_fast.pop(str(tokenizer_file), None)
        all_tokens_path.unlink(missing_ok=True)

    special = special_tokens(tokenizer)
    meta = {
        "format_version": META_FORMAT_VERSION,
        "tokenizer": {"file": str(tokenizer_file.resolve()), "sha256": tokenizer_fingerprint(tokenizer_file),
                      "vocab_size": vocab_size, "engine": "tiktoken" if fast is not None else "tokenizers"},
        "special_tokens": {"bos": special.bos, "pad": special.pad, "eos": special.eos, "unk": special.unk,
                           "mask": special.mask},
        "dtype": dtype.name,
        # The largest id in the data: checked against the vocabulary size where the dataset is opened.
        "max_token_id": max_token_id,
        "valid_fraction": config.valid_fraction,
        "seed": config.seed,
        "valid_assignment": VALID_ASSIGNMENT,
        "splits": counts,
        "documents": counts["train"]["documents"] + counts["valid"]["documents"],
        "tokens": counts["train"]["tokens"] + counts["valid"]["tokens"],
        "empty_documents_skipped": reader.stats.empty_documents + n_empty_tokenized,
        "invalid_utf8_replaced": reader.stats.invalid_utf8_replaced,
        "text_bytes": reader.stats.text_bytes,
        "sources": [{"path": str(path.resolve()), "format": detect_format(path)
                     if config.input_format == "auto" else config.input_format} for path in inputs],
        **({"shard": list(config.shard)} if config.shard is not None else {}),
    }
    meta_file = staging / dataset_file_names(prefix)[-1]
    with naming_path(meta_file), open(meta_file, "w", encoding="utf-8") as stream:
        json.dump(meta, stream, indent=2)
        stream.write("\n")
    return dict(meta, invalid_utf8_by_file=dict(reader.stats.invalid_utf8_by_file))


# ----------------------------------------------------------------------------------------------------------------
# CLI


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipeline preprocess", description=__doc__.splitlines()[0])
    parser.add_argument("--input", nargs="+", required=True,
                        help="text/JSONL/Parquet files, globs, or saved HF datasets directories")
    parser.add_argument("--tokenizer", required=True, help="tokenizer.json or a directory holding one")
    parser.add_argument("--output-prefix", required=True)
    parser.add_argument("--format", dest="input_format", choices=FORMATS, default="auto")
    parser.add_argument("--text-key", default="text", help="JSONL field / column with the text (default: text)")
    parser.add_argument("--one-doc-per-line", action="store_true",
                        help="plain text: one document per line (default: blank-line separated)")
    parser.add_argument("--valid-fraction", type=float, default=PreprocessConfig.valid_fraction)
    parser.add_argument("--seed", type=int, default=PreprocessConfig.seed)
    parser.add_argument("--workers", type=int, default=max(1, min(8, os.cpu_count() or 1)))
    parser.add_argument("--replace-invalid", action="store_true",
                        help="replace invalid UTF-8 with U+FFFD (counted) instead of failing")
    parser.add_argument("--no-fast-tokenizer", dest="fast_tokenizer", action="store_false",
                        help="always encode with HF tokenizers (default: tiktoken where it gives the same ids)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--shard", type=_shard_argument, default=None, metavar="I/N",
                        help="tokenize only shard I (0-based) of N of the input files into "
                             "OUTPUT_PREFIX-shard-0000I-of-0000N (a Slurm array task); `python -m pipeline merge` "
                             "joins the shards")
    return parser


def _shard_argument(text: str) -> tuple[int, int]:
    match = re.fullmatch(r"(\d+)/(\d+)", text.strip())
    if match is None:
        raise argparse.ArgumentTypeError(f"expected I/N (e.g. 3/16), got {text!r}")
    return int(match.group(1)), int(match.group(2))


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = PreprocessConfig(
            inputs=args.input, tokenizer=args.tokenizer, output_prefix=args.output_prefix,
            input_format=args.input_format, text_key=args.text_key, one_doc_per_line=args.one_doc_per_line,
            valid_fraction=args.valid_fraction, seed=args.seed, workers=args.workers,
            replace_invalid=args.replace_invalid, fast_tokenizer=args.fast_tokenizer, show_progress=not args.quiet,
            shard=args.shard)
    except ValueError as error:
        raise DataError(str(error)) from None
    meta = preprocess(config)
    splits = meta["splits"]
    written = args.output_prefix if args.shard is None else shard_prefix(args.output_prefix, *args.shard)
    print(f"wrote {written}_{{train,valid}}.{{bin,idx}}: train {splits['train']['documents']} documents / "
          f"{splits['train']['tokens']} tokens, valid {splits['valid']['documents']} documents / "
          f"{splits['valid']['tokens']} tokens; {meta['empty_documents_skipped']} empty documents skipped")
    return 0


if __name__ == "__main__":
    exit_on_data_error(main)
