"""Byte-level BPE tokenizer with RoBERTa's special tokens: train one, import GPT-2/RoBERTa files, load it.

``python -m pipeline tokenizer train --input corpus.txt --vocab-size 32000 --output tok/tokenizer.json`` trains a
byte-level BPE (HF ``tokenizers``) whose first five ids are ``<s> <pad> </s> <unk> <mask>`` (0..4, as in
RoBERTa). ``python -m pipeline tokenizer import --vocab vocab.json --merges merges.txt --output ...`` converts
GPT-2/RoBERTa files, adding the special tokens the vocabulary lacks. Either way the result is one
``tokenizer.json`` with a RoBERTa post-processor that ``transformers.PreTrainedTokenizerFast`` loads.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

from pipeline.io import (default_file_mode, file_sha256, library_os_error, make_parents, read_json_object,
                         remove_created, temporary_path)
from pipeline.errors import DataError, exit_on_data_error
from pipeline.data.batch import SpecialTokens

BOS, PAD, EOS, UNK, MASK = "<s>", "<pad>", "</s>", "<unk>", "<mask>"
# Order matters: trained tokenizers get these ids 0..4, like RoBERTa's.
SPECIAL_TOKEN_STRINGS = (BOS, PAD, EOS, UNK, MASK)
TOKENIZER_FILE = "tokenizer.json"


def resolve_tokenizer_file(path: str | os.PathLike) -> Path:
    """``path`` itself if it is a file, else ``path/tokenizer.json``; DataError if neither exists."""
    path = Path(path)
    candidate = path / TOKENIZER_FILE if path.is_dir() else path
    if not candidate.is_file():
        raise DataError(f"{candidate}: tokenizer file not found")
    return candidate


def tokenizer_fingerprint(path: str | os.PathLike) -> str:
    """sha256 (hex) of the tokenizer.json bytes: recorded in a dataset's meta.json and checked against it."""
    return file_sha256(resolve_tokenizer_file(path))


def load_raw_tokenizer(path: str | os.PathLike):
    """The ``tokenizers.Tokenizer`` (fast, picklable by path) behind a tokenizer.json; DataError if corrupt."""
    from tokenizers import Tokenizer

    file = resolve_tokenizer_file(path)
    try:
        tokenizer = Tokenizer.from_file(str(file))
    except Exception as error:  # tokenizers raises a bare Exception on malformed JSON
        raise DataError(f"{file}: not a valid tokenizer.json ({_first_line(error)})") from None
    missing = [token for token in SPECIAL_TOKEN_STRINGS if tokenizer.token_to_id(token) is None]
    if missing:
        raise DataError(f"{file}: tokenizer lacks the special tokens {' '.join(missing)}")
    return tokenizer


def load_tokenizer(path: str | os.PathLike):
    """A ``transformers.PreTrainedTokenizerFast`` over a tokenizer.json (or a directory holding one), with the
    RoBERTa special tokens registered (bos/cls ``<s>``, eos/sep ``</s>``, pad, unk, mask)."""
    from transformers import PreTrainedTokenizerFast

    file = resolve_tokenizer_file(path)
    load_raw_tokenizer(file)  # validates the file and the special tokens with a clear message
    return PreTrainedTokenizerFast(
        tokenizer_file=str(file), bos_token=BOS, eos_token=EOS, cls_token=BOS, sep_token=EOS,
        pad_token=PAD, unk_token=UNK, mask_token=MASK)


def special_tokens(tokenizer) -> SpecialTokens:
    """Ids of the special tokens of a ``PreTrainedTokenizerFast`` or a raw ``tokenizers.Tokenizer``."""
    vocab = tokenizer.get_vocab()  # (convert_tokens_to_ids would map a missing token to <unk>'s id)
    ids = {token: vocab.get(token) for token in SPECIAL_TOKEN_STRINGS}
    missing = [token for token, token_id in ids.items() if token_id is None]
    if missing:
        raise DataError(f"tokenizer lacks the special tokens {' '.join(missing)}")
    return SpecialTokens(bos=ids[BOS], pad=ids[PAD], eos=ids[EOS], unk=ids[UNK], mask=ids[MASK])


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _attach_roberta_post_processor(tokenizer) -> None:
    from tokenizers.processors import RobertaProcessing

    tokenizer.post_processor = RobertaProcessing(
        (EOS, tokenizer.token_to_id(EOS)), (BOS, tokenizer.token_to_id(BOS)), trim_offsets=True,
        add_prefix_space=False)


def _save(tokenizer, output: str | os.PathLike) -> Path:
    """Writes tokenizer.json atomically (temporary name, then one rename); an I/O failure is an OSError naming
    the file (the Rust library reports it as a plain Exception)."""
    output = Path(output)
    if output.is_dir() or output.suffix != ".json":
        output = output / TOKENIZER_FILE
    created = make_parents(output.parent)
    temporary = temporary_path(output)
    try:
        try:
            tokenizer.save(str(temporary))
        except Exception as error:
            os_error = library_os_error(error, output)
            if os_error is None:
                raise
            raise os_error from None
        os.chmod(temporary, default_file_mode())
        os.replace(temporary, output)
    except BaseException:
        try:
            temporary.unlink(missing_ok=True)
        except OSError:  # a read-only directory fails this too: keep the first error
            pass
        remove_created(created)
        raise
    return output


@dataclass(frozen=True)
class TrainConfig:
    """Byte-level BPE training settings."""

    vocab_size: int = 32000
    """Final vocabulary size, the 5 special tokens and the 256 byte symbols included."""
    min_frequency: int = 2
    """A pair is merged only if it occurs at least this often."""
    lowercase: bool = False
    """Lowercase text before tokenizing (RoBERTa does not)."""

    def __post_init__(self):
        if self.vocab_size < 256 + len(SPECIAL_TOKEN_STRINGS):
            raise ValueError(f"vocab_size must be at least {256 + len(SPECIAL_TOKEN_STRINGS)}, got {self.vocab_size}")
        if self.min_frequency < 1:
            raise ValueError(f"min_frequency must be >= 1, got {self.min_frequency}")


def _training_texts(reader, batch_size: int = 1000) -> Iterator[list[str]]:
    """Batches of the reader's texts (lines of text files; the ``text_key`` of JSONL, Parquet, HF datasets)."""
    batch = []
    for text in reader:
        batch.append(text)
        if len(batch) >= batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def _byte_level_bpe(model, lowercase: bool = False):
    """A GPT-2/RoBERTa byte-level BPE ``tokenizers.Tokenizer`` around ``model`` (a ``tokenizers.models.BPE``): the
    components ``tokenizers``' ByteLevelBPETokenizer assembles, built from the public API because that wrapper only
    exposes the Tokenizer it holds as a private attribute."""
    from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors

    tokenizer = Tokenizer(model)
    if lowercase:
        tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=True)  # replaced by the RoBERTa one below
    return tokenizer


def train_tokenizer(files: Sequence[str | os.PathLike], output: str | os.PathLike,
                    config: TrainConfig = TrainConfig(), show_progress: bool = False, text_key: str = "text",
                    replace_invalid: bool = False) -> Path:
    """Trains a byte-level BPE on the inputs and writes tokenizer.json; returns its path. Inputs are read like
    ``pipeline.data.preprocess`` reads them: plain text (also .gz/.xz/.bz2), JSONL / Parquet (field ``text_key``), saved
    HF datasets directories; invalid UTF-8 (a binary file) is a DataError naming the file and byte, unless
    ``replace_invalid`` (then replaced with U+FFFD, counted and warned). A vocabulary smaller than asked for (too
    little text) is warned on stderr."""
    from tokenizers import pre_tokenizers, trainers
    from tokenizers.models import BPE

    from pipeline.data.corpus import DocumentReader

    if not files:
        raise DataError("no input files given for tokenizer training")
    for file in files:
        if not Path(file).exists():
            raise DataError(f"{file}: input file not found")
        if Path(file).is_file() and Path(file).stat().st_size == 0:
            raise DataError(f"{file}: input file is empty")
    reader = DocumentReader([Path(file) for file in files], "auto", text_key, one_doc_per_line=True,
                            replace_invalid=replace_invalid)
    tokenizer = _byte_level_bpe(BPE(), lowercase=config.lowercase)
    trainer = trainers.BpeTrainer(vocab_size=config.vocab_size, min_frequency=config.min_frequency,
                                  show_progress=show_progress, special_tokens=list(SPECIAL_TOKEN_STRINGS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(_training_texts(reader), trainer=trainer)
    if reader.stats.invalid_utf8_replaced:
        counts = ", ".join(f"{name} ({count})" for name, count in reader.stats.invalid_utf8_by_file.items())
        print(f"warning: replaced {reader.stats.invalid_utf8_replaced} invalid UTF-8 sequences with U+FFFD in "
              f"{counts}", file=sys.stderr)
    if tokenizer.get_vocab_size() < config.vocab_size:
        print(f"warning: the trained vocabulary has {tokenizer.get_vocab_size()} tokens, fewer than the "
              f"{config.vocab_size} asked for: the input ({reader.stats.text_bytes} bytes) has no more pairs seen "
              f"at least {config.min_frequency} times (more text or a lower --min-frequency gives more)",
              file=sys.stderr)
    for expected_id, token in enumerate(SPECIAL_TOKEN_STRINGS):
        if tokenizer.token_to_id(token) != expected_id:
            raise RuntimeError(f"special token {token} got id {tokenizer.token_to_id(token)}, expected {expected_id}")
    _attach_roberta_post_processor(tokenizer)
    return _save(tokenizer, output)


def import_tokenizer(vocab_file: str | os.PathLike, merges_file: str | os.PathLike,
                     output: str | os.PathLike) -> Path:
    """Converts GPT-2/RoBERTa ``vocab.json`` + ``merges.txt`` into one tokenizer.json; special tokens missing from
    the vocabulary (all but ``<|endoftext|>`` for GPT-2) are appended after it."""
    from tokenizers import AddedToken
    from tokenizers.models import BPE

    for file in (vocab_file, merges_file):
        if not Path(file).is_file():
            raise DataError(f"{file}: file not found")
    vocab = read_json_object(vocab_file, "JSON vocabulary (an object mapping tokens to ids)")
    wrong = next(((token, token_id) for token, token_id in vocab.items()
                  if not isinstance(token_id, int) or isinstance(token_id, bool) or token_id < 0), None)
    if wrong is not None:
        raise DataError(f"{vocab_file}: token {wrong[0]!r} has the id {wrong[1]!r}; ids must be non-negative "
                        "integers")
    try:
        vocab, merges = BPE.read_file(str(vocab_file), str(merges_file))
        model = BPE(vocab, merges, continuing_subword_prefix="", end_of_word_suffix="")
    except Exception as error:
        raise DataError(f"{merges_file}: cannot build a BPE from these files ({_first_line(error)})") from None
    tokenizer = _byte_level_bpe(model)
    # <mask> strips the space before it, as in RoBERTa; the others are plain special tokens.
    tokenizer.add_special_tokens([
        AddedToken(token, lstrip=(token == MASK), special=True) for token in SPECIAL_TOKEN_STRINGS])
    _attach_roberta_post_processor(tokenizer)
    return _save(tokenizer, output)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipeline tokenizer", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="train a byte-level BPE on text files")
    train.add_argument("--input", nargs="+", required=True,
                       help="text files (plain, .gz, .xz, .bz2), JSONL, Parquet or saved HF datasets directories")
    train.add_argument("--text-key", default="text", help="JSONL field / column with the text (default: text)")
    train.add_argument("--output", required=True, help="tokenizer.json path or a directory to put it in")
    train.add_argument("--vocab-size", type=int, default=TrainConfig.vocab_size)
    train.add_argument("--min-frequency", type=int, default=TrainConfig.min_frequency)
    train.add_argument("--lowercase", action="store_true")
    train.add_argument("--replace-invalid", action="store_true",
                       help="replace invalid UTF-8 with U+FFFD (counted) instead of failing")
    imported = commands.add_parser("import", help="convert GPT-2/RoBERTa vocab.json + merges.txt")
    imported.add_argument("--vocab", required=True, help="vocab.json")
    imported.add_argument("--merges", required=True, help="merges.txt")
    imported.add_argument("--output", required=True, help="tokenizer.json path or a directory to put it in")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "train":
        try:
            config = TrainConfig(args.vocab_size, args.min_frequency, args.lowercase)
        except ValueError as error:
            raise DataError(str(error)) from None
        output = train_tokenizer(args.input, args.output, config, show_progress=True, text_key=args.text_key,
                                 replace_invalid=args.replace_invalid)
    else:
        output = import_tokenizer(args.vocab, args.merges, args.output)
    tokenizer = load_raw_tokenizer(output)
    print(f"wrote {output}: vocab size {tokenizer.get_vocab_size()}, sha256 {tokenizer_fingerprint(output)[:16]}")
    return 0


if __name__ == "__main__":
    exit_on_data_error(main)
