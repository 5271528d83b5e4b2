"""Reading corpora: the input formats (plain text, JSONL, Parquet, saved HF datasets; compressed or not) and
``DocumentReader``, which yields their documents. Used by preprocessing and tokenizer training alike."""

from __future__ import annotations

import bz2
import codecs
import glob
import gzip
import json
import lzma
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Iterator, Sequence

from pipeline.errors import DataError

FORMATS = ("auto", "text", "jsonl", "parquet", "hf")
_COMPRESSED_OPENERS = {".gz": gzip.open, ".xz": lzma.open, ".lzma": lzma.open, ".bz2": bz2.open}
_REPLACEMENT_CHARACTER_UTF8 = "\ufffd".encode("utf-8")


def open_input_binary(path: str | os.PathLike) -> BinaryIO:
    """Opens a file for binary reading, decompressing ``.gz``, ``.xz``/``.lzma`` and ``.bz2`` transparently."""
    opener = _COMPRESSED_OPENERS.get(Path(path).suffix.lower(), open)
    return opener(path, "rb")




def detect_format(path: Path) -> str:
    if path.is_dir():
        if any((path / marker).is_file() for marker in ("dataset_info.json", "dataset_dict.json", "state.json")):
            return "hf"
        raise DataError(f"{path}: directory is not a saved HF datasets directory (no dataset_info.json or "
                        "dataset_dict.json)")
    suffixes = [suffix.lower() for suffix in path.suffixes]
    if suffixes and suffixes[-1] in _COMPRESSED_OPENERS:
        suffixes = suffixes[:-1]
    last = suffixes[-1] if suffixes else ""
    if last in (".jsonl", ".json", ".ndjson"):
        return "jsonl"
    if last in (".parquet", ".pq"):
        return "parquet"
    return "text"


@dataclass
class ReadStats:
    """What reading the inputs found, reported in meta.json."""

    documents: int = 0
    empty_documents: int = 0
    invalid_utf8_replaced: int = 0
    text_bytes: int = 0  # UTF-8 bytes of the documents read (after decompression)
    invalid_utf8_by_file: dict[str, int] = field(default_factory=dict)


class DocumentReader:
    """Yields the documents of the inputs as stripped strings, skipping (and counting) empty ones."""

    def __init__(self, inputs: Sequence[Path], input_format: str, text_key: str, one_doc_per_line: bool,
                 replace_invalid: bool):
        self.inputs = list(inputs)
        self.input_format = input_format
        self.text_key = text_key
        self.one_doc_per_line = one_doc_per_line
        self.replace_invalid = replace_invalid
        self.stats = ReadStats()

    def __iter__(self) -> Iterator[str]:
        for document, _ in self.documents_with_positions():
            yield document

    def documents_with_positions(self) -> Iterator[tuple[str, tuple[Path, int]]]:
        """(document, (file, its number in the file from 1, empty documents counted)) for error messages."""
        for path in self.inputs:
            input_format = detect_format(path) if self.input_format == "auto" else self.input_format
            reader = {"text": self._text, "jsonl": self._jsonl, "parquet": self._parquet, "hf": self._hf}[input_format]
            for number, document in enumerate(reader(path), start=1):
                document = document.strip() if document is not None else ""
                if not document:
                    self.stats.empty_documents += 1
                    continue
                self.stats.documents += 1
                yield document, (path, number)

    def _decode(self, path: Path, raw_line: bytes, line_start: int) -> str:
        try:
            return raw_line.decode("utf-8")
        except UnicodeDecodeError as error:
            offset = line_start + error.start
            where = " of the decompressed text" if path.suffix.lower() in _COMPRESSED_OPENERS else ""
            if not self.replace_invalid:
                raise DataError(f"{path}: invalid UTF-8 at byte {offset}{where}; pass --replace-invalid to replace "
                                "invalid bytes with U+FFFD") from None
            text = raw_line.decode("utf-8", errors="replace")
            replaced = text.count("\ufffd") - raw_line.count(_REPLACEMENT_CHARACTER_UTF8)
            self.stats.invalid_utf8_replaced += replaced
            self.stats.invalid_utf8_by_file[str(path)] = self.stats.invalid_utf8_by_file.get(str(path), 0) + replaced
            return text

    def _lines(self, path: Path) -> Iterator[tuple[int, str]]:
        """(line number from 1, decoded line) of a text or JSONL file."""
        offset = 0
        with open_input_binary(path) as stream:
            try:
                for line_number, raw_line in enumerate(stream, start=1):
                    if line_number == 1 and raw_line.startswith(codecs.BOM_UTF8):  # a BOM is not text
                        yield line_number, self._decode(path, raw_line[len(codecs.BOM_UTF8):], len(codecs.BOM_UTF8))
                    else:
                        yield line_number, self._decode(path, raw_line, offset)
                    offset += len(raw_line)
                    self.stats.text_bytes += len(raw_line)
            except (OSError, EOFError, lzma.LZMAError) as error:
                raise DataError(f"{path}: cannot read ({error})") from None

    def _text(self, path: Path) -> Iterator[str]:
        if self.one_doc_per_line:
            for _, line in self._lines(path):
                yield line
            return
        paragraph: list[str] = []
        for _, line in self._lines(path):
            if line.strip():
                paragraph.append(line)
            elif paragraph:
                yield "".join(paragraph)
                paragraph = []
        if paragraph:
            yield "".join(paragraph)

    def _jsonl(self, path: Path) -> Iterator[str]:
        for line_number, line in self._lines(path):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(f"{path}:{line_number}: invalid JSON ({error.msg})") from None
            if not isinstance(record, dict) or self.text_key not in record:
                raise DataError(f"{path}:{line_number}: no {self.text_key!r} field (set --text-key)")
            yield self._check_text(path, record[self.text_key], f"line {line_number}")

    def _check_text(self, path: Path, value, where: str) -> str:
        if value is None:
            return ""
        if not isinstance(value, str):
            raise DataError(f"{path}: {where}: {self.text_key!r} is a {type(value).__name__}, expected a string")
        return value

    def _count_bytes(self, texts: list) -> None:
        self.stats.text_bytes += sum(len(text.encode("utf-8")) for text in texts if isinstance(text, str))

    def _parquet(self, path: Path) -> Iterator[str]:
        import pyarrow.parquet as pq

        try:
            parquet = pq.ParquetFile(path)
        except Exception as error:  # pyarrow raises ArrowInvalid / OSError for non-Parquet files
            raise DataError(f"{path}: not a readable Parquet file ({error})") from None
        if self.text_key not in parquet.schema_arrow.names:
            raise DataError(f"{path}: no column {self.text_key!r} (columns: {', '.join(parquet.schema_arrow.names)}; "
                            "set --text-key)")
        row = 0
        for batch in parquet.iter_batches(batch_size=1024, columns=[self.text_key]):
            texts = batch.column(0).to_pylist()
            self._count_bytes(texts)
            for text in texts:
                row += 1
                yield self._check_text(path, text, f"row {row}")

    def _hf(self, path: Path) -> Iterator[str]:
        import datasets

        try:
            loaded = datasets.load_from_disk(str(path))
        except Exception as error:  # datasets raises FileNotFoundError / various for damaged directories
            raise DataError(f"{path}: cannot load the saved HF dataset ({error})") from None
        parts = [loaded[name] for name in loaded] if isinstance(loaded, datasets.DatasetDict) else [loaded]
        for part in parts:
            if self.text_key not in part.column_names:
                raise DataError(f"{path}: no column {self.text_key!r} (columns: {', '.join(part.column_names)}; "
                                "set --text-key)")
            row = 0
            for batch in part.select_columns([self.text_key]).iter(batch_size=1024):
                texts = batch[self.text_key]
                self._count_bytes(texts)
                for text in texts:
                    row += 1
                    yield self._check_text(path, text, f"row {row}")


def expand_inputs(inputs: Sequence[str | os.PathLike]) -> list[Path]:
    """Input paths with shell-style globs expanded; DataError for a missing or empty input."""
    paths: list[Path] = []
    for item in inputs:
        item = str(item)
        if glob.has_magic(item):
            matches = sorted(glob.glob(item))
            if not matches:
                raise DataError(f"{item}: no input file matches this pattern")
            paths.extend(Path(match) for match in matches)
        else:
            paths.append(Path(item))
    if not paths:
        raise DataError("no input files given")
    for path in paths:
        if not path.exists():
            raise DataError(f"{path}: input not found")
        if path.is_file() and path.stat().st_size == 0:
            raise DataError(f"{path}: input file is empty")
    return paths
