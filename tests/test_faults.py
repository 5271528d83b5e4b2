"""Faults never lose data and never end in a traceback (issue 14): preprocessing and tokenizer training under
injected failures (a rename that fails, a process killed mid-publication, a full or read-only filesystem, dead
writers' leftovers) and under input that used to slip through (an empty split, an edited meta.json, a directory as
output prefix, a binary file for tokenizer training). Export's faults are in test_export.py.

Full and read-only filesystems are small tmpfs mounts (root only; skipped otherwise, with the reason)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline.errors import DataError
from pipeline.data.preprocess import PreprocessConfig, preprocess
from pipeline.data.tokenizer import TrainConfig, train_tokenizer

REPO = Path(__file__).resolve().parents[1]
DATASET_FILES = ("_train.bin", "_train.idx", "_valid.bin", "_valid.idx", ".meta.json")


def _env() -> dict:
    return dict(os.environ, PYTHONPATH=str(REPO), TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")


def _preprocess(prefix, source, tokenizer, **overrides) -> dict:
    settings = dict(one_doc_per_line=True, valid_fraction=0.1, workers=1, show_progress=False)
    settings.update(overrides)
    return preprocess(PreprocessConfig(inputs=[source], tokenizer=tokenizer, output_prefix=prefix, **settings))


def _cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline", *args], capture_output=True, text=True, env=_env(),
                          timeout=timeout, cwd=REPO)


def _dataset_bytes(prefix) -> dict[str, bytes]:
    """The bytes each of a dataset's five names shows (a missing one fails)."""
    return {suffix: Path(f"{prefix}{suffix}").read_bytes() for suffix in DATASET_FILES}


def _everything(directory: Path) -> list[str]:
    return sorted(str(path.relative_to(directory)) for path in directory.rglob("*"))


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory, english_text_file) -> Path:
    """The first 60 documents of the Lee corpus (preprocessing it takes well under a second)."""
    path = tmp_path_factory.mktemp("small_corpus") / "small.txt"
    path.write_text("".join(english_text_file.read_text(encoding="utf-8").splitlines(keepends=True)[:60]),
                    encoding="utf-8")
    return path


def _mount_tmpfs(directory: Path, size: str) -> None:
    if os.geteuid() != 0:
        pytest.skip("a full / read-only filesystem is simulated with a tmpfs mount, which needs root")
    directory.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(directory)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({result.stderr.strip()})")


@pytest.fixture
def mounts():
    """Mounts small tmpfs filesystems for a test and unmounts them afterwards."""
    mounted: list[Path] = []

    def mount(directory: Path, size: str) -> Path:
        _mount_tmpfs(directory, size)
        mounted.append(directory)
        return directory

    yield mount
    for directory in reversed(mounted):
        subprocess.run(["umount", "-l", str(directory)], capture_output=True)


def _remount_read_only(directory: Path) -> None:
    result = subprocess.run(["mount", "-o", "remount,ro", str(directory)], capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot remount read-only ({result.stderr.strip()})")


# ---------------------------------------------------------------------------------------------- item 2: publication


def test_dataset_layout_is_one_directory_behind_stable_links(tmp_path, small_corpus, tiny_tokenizer):
    prefix = tmp_path / "d"
    _preprocess(prefix, small_corpus, tiny_tokenizer)
    for suffix in DATASET_FILES:
        assert os.readlink(f"{prefix}{suffix}") == f"d.dataset/d{suffix}"
    assert sorted(path.name for path in (tmp_path / "d.dataset").iterdir()) == sorted(f"d{s}" for s in DATASET_FILES)


@pytest.mark.parametrize("failing_call", [1, 2, 3, 4, 5, 6])
def test_a_rename_failing_anywhere_leaves_the_previous_dataset_whole(tmp_path, small_corpus, tiny_tokenizer,
                                                                     english_text_file, failing_call, monkeypatch):
    """The n-th rename of the replacing run fails (EIO): the old dataset is still complete, byte for byte, at its
    names, and nothing else is left. (The code before issue 14 renamed five files one by one after deleting
    meta.json: a failure on its 3rd rename left new train files beside old valid files and no meta.json.)"""
    import pipeline.io as io_module

    prefix = tmp_path / "d"
    _preprocess(prefix, small_corpus, tiny_tokenizer)
    before, listing = _dataset_bytes(prefix), _everything(tmp_path)
    calls = {"n": 0}

    def failing(real):
        def call(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == failing_call:
                raise OSError(5, "Input/output error", str(args[-1]))
            return real(*args, **kwargs)
        return call

    monkeypatch.setattr(os, "rename", failing(os.rename))
    monkeypatch.setattr(os, "replace", failing(os.replace))
    if hasattr(io_module, "_exchange"):  # (so that the test runs on the code before issue 14 too)
        monkeypatch.setattr(io_module, "_exchange", failing(io_module._exchange))
    try:
        _preprocess(prefix, english_text_file, tiny_tokenizer)  # another corpus: every file differs
    except OSError as error:
        assert error.errno == 5
        assert _dataset_bytes(prefix) == before and _everything(tmp_path) == listing
    else:  # the failing call came after the one rename that published: the new dataset is whole
        assert calls["n"] < failing_call or _dataset_bytes(prefix) != before
        meta = json.loads(Path(f"{prefix}.meta.json").read_text())
        assert meta["documents"] == 300 and len(np.fromfile(f"{prefix}_train.bin", dtype=np.uint16)) == \
            meta["splits"]["train"]["tokens"]


_KILL_AT = """
import os, signal, sys
import pipeline.io as io_module
real = io_module._exchange
def exchange_then_die(first, second):
    if sys.argv[1] == "after":
        real(first, second)
    os.kill(os.getpid(), signal.SIGKILL)
io_module._exchange = exchange_then_die
from pipeline.data.preprocess import PreprocessConfig, preprocess
preprocess(PreprocessConfig(inputs=[sys.argv[2]], tokenizer=sys.argv[3], output_prefix=sys.argv[4],
                            one_doc_per_line=True, valid_fraction=0.1, workers=1, show_progress=False))
"""


@pytest.mark.parametrize("when", ["before", "after"])
def test_kill_9_during_publication_loses_nothing_and_the_next_run_sweeps(tmp_path, small_corpus, tiny_tokenizer,
                                                                        english_text_file, when):
    """SIGKILL just before / just after the one rename: the names show the whole old / whole new dataset; the
    staging directory left behind (as large as the output) is removed by the next run (items 2 and 9)."""
    prefix = tmp_path / "d"
    _preprocess(prefix, small_corpus, tiny_tokenizer)
    old = _dataset_bytes(prefix)
    new_prefix = tmp_path / "fresh" / "d"
    _preprocess(new_prefix, english_text_file, tiny_tokenizer)
    new = _dataset_bytes(new_prefix)
    result = subprocess.run([sys.executable, "-c", _KILL_AT, when, str(english_text_file), str(tiny_tokenizer),
                             str(prefix)], env=_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == -signal.SIGKILL, result.stderr
    assert _dataset_bytes(prefix) == (old if when == "before" else new)
    leftovers = [name for name in _everything(tmp_path) if name.startswith(".d.dataset.tmp-")]
    assert leftovers  # the killed run's staging directory (or the old generation, swapped into it)
    _preprocess(prefix, small_corpus, tiny_tokenizer)
    assert _dataset_bytes(prefix) == old
    assert not [name for name in _everything(tmp_path) if ".tmp-" in name or ".old-" in name]


def test_old_layout_dataset_is_adopted_without_a_moment_of_loss(tmp_path, small_corpus, tiny_tokenizer,
                                                               english_text_file, monkeypatch):
    """A dataset of plain files (written before PREFIX.dataset/ existed) keeps its bytes at its names while it is
    moved behind links; a failure of the new run's publication then leaves it whole."""
    import pipeline.io as io_module

    prefix = tmp_path / "d"
    _preprocess(prefix, small_corpus, tiny_tokenizer)
    old = _dataset_bytes(prefix)
    for suffix in DATASET_FILES:  # make it the old layout: plain files, no directory
        Path(f"{prefix}{suffix}").unlink()
        Path(f"{prefix}{suffix}").write_bytes(old[suffix])
    for path in (tmp_path / "d.dataset").iterdir():
        path.unlink()
    (tmp_path / "d.dataset").rmdir()

    def broken_exchange(first, second):
        raise OSError(5, "Input/output error", str(second))

    monkeypatch.setattr(io_module, "_exchange", broken_exchange)
    with pytest.raises(OSError):
        _preprocess(prefix, english_text_file, tiny_tokenizer)
    assert _dataset_bytes(prefix) == old and os.path.islink(f"{prefix}_train.bin")
    monkeypatch.undo()
    for suffix in DATASET_FILES:  # the old layout again, replaced by a run that succeeds
        Path(f"{prefix}{suffix}").unlink()
        Path(f"{prefix}{suffix}").write_bytes(old[suffix])
    shutil.rmtree(tmp_path / "d.dataset")
    meta = _preprocess(prefix, english_text_file, tiny_tokenizer)
    assert meta["documents"] == 300 and json.loads(Path(f"{prefix}.meta.json").read_text()) == meta
    assert _everything(tmp_path) == sorted(["d.dataset"] + [f"d.dataset/d{s}" for s in DATASET_FILES]
                                           + [f"d{s}" for s in DATASET_FILES])


# ---------------------------------------------------------------------------------------- item 3: an empty split


def test_empty_valid_split_is_named_at_preprocess_and_where_it_is_opened(tmp_path, small_corpus, tiny_tokenizer,
                                                                         capfd):
    from pipeline.data.dataset import open_indexed_dataset

    prefix = tmp_path / "d"
    meta = _preprocess(prefix, small_corpus, tiny_tokenizer, valid_fraction=0.0)
    assert meta["splits"]["valid"] == {"documents": 0, "tokens": 0}
    assert "the valid split is empty" in capfd.readouterr().err
    with pytest.raises(DataError, match=r"d_valid.idx: the split is empty .*--eval-interval 0"):
        open_indexed_dataset(f"{prefix}_valid")
    assert "Exception ignored" not in capfd.readouterr().err  # no megatron-core __del__ noise
    assert len(open_indexed_dataset(f"{prefix}_train")) == 60


# -------------------------------------------------------------------------------- item 4: meta.json vs the data


def test_meta_vocab_size_smaller_than_the_ids_in_the_data_is_refused(tmp_path, small_corpus, tiny_tokenizer):
    from pipeline.data.batch import SpecialTokens
    from pipeline.data.dataset import check_dataset_vocabulary

    prefix = tmp_path / "d"
    meta = _preprocess(prefix, small_corpus, tiny_tokenizer)
    ids = np.concatenate([np.fromfile(f"{prefix}_{split}.bin", dtype=np.uint16) for split in ("train", "valid")])
    assert meta["max_token_id"] == int(ids.max()) > 500
    special = SpecialTokens(bos=0, pad=1, eos=2, unk=3, mask=4)
    check_dataset_vocabulary(prefix, special, 1000)  # the real vocabulary: fine
    meta_file = Path(f"{prefix}.meta.json")
    edited = json.loads(meta_file.read_text())
    edited["tokenizer"]["vocab_size"] = 500
    meta_file.write_text(json.dumps(edited))
    with pytest.raises(DataError, match=rf"d.meta.json: the data holds token id {ids.max()}, but the vocab size "
                                        r"recorded here is 500"):
        check_dataset_vocabulary(prefix, special, 512)
    del edited["max_token_id"]  # a dataset from before the field existed: the ids are read from the data
    meta_file.write_text(json.dumps(edited))
    with pytest.raises(DataError, match=rf"token id {ids.max()}"):
        check_dataset_vocabulary(prefix, special, 512)


# ------------------------------------------------------------------------------- items 6, 7: full and read-only


def test_disk_full_is_one_line_naming_the_file_and_leaves_nothing(tmp_path, english_text_file, tiny_tokenizer,
                                                                  mounts):
    disk = mounts(tmp_path / "disk", "64k")
    result = _cli("preprocess", "--input", str(english_text_file), "--tokenizer", str(tiny_tokenizer),
                  "--output-prefix", str(disk / "new" / "d"), "--one-doc-per-line", "--workers", "1", "--quiet")
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {disk}/new/") and last.endswith(": no space left on device"), last
    assert _everything(disk) == []  # no staging directory, no empty output directory (item 12)


def test_read_only_output_is_one_line_and_the_dataset_survives(tmp_path, small_corpus, tiny_tokenizer, mounts):
    disk = mounts(tmp_path / "disk", "8m")
    prefix = disk / "d"
    _preprocess(prefix, small_corpus, tiny_tokenizer)
    before, listing = _dataset_bytes(prefix), _everything(disk)
    _remount_read_only(disk)
    with pytest.raises(OSError) as raised:  # the first error, not one from the cleanup
        _preprocess(prefix, small_corpus, tiny_tokenizer)
    assert raised.value.errno == 30 and str(raised.value.filename).startswith(str(disk))
    assert raised.value.__context__ is None
    result = _cli("preprocess", "--input", str(small_corpus), "--tokenizer", str(tiny_tokenizer),
                  "--output-prefix", str(prefix), "--one-doc-per-line", "--quiet")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].endswith(": read-only file system")
    assert _dataset_bytes(prefix) == before and _everything(disk) == listing


# ------------------------------------------------------------------------------------ item 9: dead writers


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_leftovers_of_killed_runs_are_swept(tmp_path, small_corpus, tiny_tokenizer):
    dead = _dead_pid()
    prefix = tmp_path / "d"
    staging = tmp_path / f".d.dataset.tmp-{dead}"  # this layout's staging directory
    staging.mkdir()
    (staging / "all-tokens.bin").write_bytes(b"\0" * 4096)
    older = [tmp_path / f"d_train.bin.tmp-{dead}", tmp_path / f"d.all.bin.tmp-{dead}"]  # the older per-file ones
    for path in older:
        path.write_bytes(b"\0" * 4096)
    link_temporary = tmp_path / f".d_train.idx.tmp-{dead}"  # a symlink of a killed link_atomic
    link_temporary.symlink_to("d.dataset/d_train.idx")
    alive = tmp_path / f"d_valid.bin.tmp-{os.getppid()}"  # a live process's file is not touched
    alive.write_bytes(b"x")
    _preprocess(prefix, small_corpus, tiny_tokenizer)
    assert not staging.exists() and not any(path.exists() for path in older) and alive.exists()
    assert not os.path.lexists(link_temporary)


# ------------------------------------------------------------------------------ item 10: a directory as prefix


@pytest.mark.parametrize("make_dir", [False, True])
def test_output_prefix_naming_a_directory_is_refused(tmp_path, small_corpus, tiny_tokenizer, make_dir):
    target = tmp_path / "out"
    if make_dir:
        target.mkdir()
    given = str(target) + ("" if make_dir else "/")
    with pytest.raises(DataError, match=rf"^{target}/?: --output-prefix names a directory; give the dataset a name "
                                        rf"inside it, e.g. {target}/corpus$"):
        _preprocess(given, small_corpus, tiny_tokenizer)
    assert _everything(tmp_path) == (["out"] if make_dir else [])


# ----------------------------------------------------------------------------- item 12: no empty output dir


def test_failed_preprocess_leaves_no_directory_it_created(tmp_path, tiny_tokenizer):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"good line\n\xff\xfe binary\n")
    with pytest.raises(DataError, match="invalid UTF-8"):
        _preprocess(tmp_path / "a" / "b" / "d", bad, tiny_tokenizer)
    assert _everything(tmp_path) == ["bad.txt"]


# --------------------------------------------------------------------------------- item 11: tokenizer training


def test_tokenizer_training_rejects_invalid_utf8_like_preprocess(tmp_path, english_text_file):
    binary = tmp_path / "blob.txt"
    binary.write_bytes(english_text_file.read_bytes()[:20000] + bytes(range(256)) * 8)
    with pytest.raises(DataError, match=r"blob.txt: invalid UTF-8 at byte 20128; pass --replace-invalid"):
        train_tokenizer([binary], tmp_path / "tok.json", TrainConfig(vocab_size=300))
    assert not (tmp_path / "tok.json").exists()
    result = _cli("tokenizer", "train", "--input", str(binary), "--output", str(tmp_path / "tok.json"),
                  "--vocab-size", "300")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: {binary}: invalid UTF-8 at byte 20128")
    path = train_tokenizer([binary], tmp_path / "tok.json", TrainConfig(vocab_size=300), replace_invalid=True)
    assert path.is_file()


def test_tokenizer_training_warns_when_the_vocabulary_is_smaller_than_asked(tmp_path, capfd):
    from pipeline.data.tokenizer import load_raw_tokenizer

    tiny = tmp_path / "tiny.txt"
    tiny.write_text("the cat sat on the mat\nthe cat sat on the hat\n", encoding="utf-8")
    path = train_tokenizer([tiny], tmp_path / "tok.json", TrainConfig(vocab_size=5000))
    size = load_raw_tokenizer(path).get_vocab_size()
    assert size < 5000
    assert f"warning: the trained vocabulary has {size} tokens, fewer than the 5000 asked for" in capfd.readouterr().err


def test_tokenizer_file_gets_the_umask_mode_and_disk_full_is_one_line(tmp_path, english_text_file, mounts):
    path = train_tokenizer([english_text_file], tmp_path / "tok.json", TrainConfig(vocab_size=300))
    mask = os.umask(0o022)
    os.umask(mask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~mask
    disk = mounts(tmp_path / "disk", "4k")
    result = _cli("tokenizer", "train", "--input", str(english_text_file), "--output", str(disk / "new" / "tok.json"),
                  "--vocab-size", "1000")
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip().splitlines()[-1] == f"error: {disk / 'new' / 'tok.json'}: no space left on device"
    assert _everything(disk) == []  # nor the directory it made


# ----------------------------------------------------------------------------- item 12: vocab.json string ids


def test_vocab_with_string_ids_is_blamed_on_the_vocabulary(tmp_path):
    from pipeline.data.tokenizer import import_tokenizer

    vocab, merges = tmp_path / "vocab.json", tmp_path / "merges.txt"
    vocab.write_text(json.dumps({"a": "0", "b": 1, "ab": 2}), encoding="utf-8")
    merges.write_text("#version: 0.2\na b\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"vocab.json: token 'a' has the id '0'; ids must be non-negative integers"):
        import_tokenizer(vocab, merges, tmp_path / "out.json")


# ---------------------------------------------------------- issue 11 risk 4: the fast path checked all run long


def test_fast_path_is_checked_on_documents_far_into_the_run(tmp_path, tiny_tokenizer, monkeypatch):
    """A fast encoder that goes wrong only after document 3000 (far past the first chunk that the start-up guard
    compares) is caught by the sampled check in the workers, which names the file and the document."""
    from pipeline.data.fast_bpe import FastByteLevelBPE

    corpus = tmp_path / "long.txt"
    lines = [f"document number {i} says hello" if i < 3000 else f"document number {i} says zebra"
             for i in range(4000)]
    corpus.write_text("\n".join(lines) + "\n", encoding="utf-8")
    real = FastByteLevelBPE.encode_batch

    def broken(self, texts):  # wrong ids for texts with "zebra" only
        return [ids[:-1] if "zebra" in text else ids for text, ids in zip(texts, real(self, texts))]

    monkeypatch.setattr(FastByteLevelBPE, "encode_batch", broken)
    # Chunks hold 256 documents; every 4th chunk k checks its document k % 256: the first checked "zebra" document
    # is in chunk 12 (documents 3072..3327), position 12: document 3085 of the file (numbered from 1).
    with pytest.raises(DataError, match=rf"^{corpus}: document 3085: the tiktoken fast path gave other ids than HF "
                                        r"tokenizers on 'document number 3084 says zebra'"):
        _preprocess(tmp_path / "d", corpus, tiny_tokenizer, valid_fraction=0.0)
    assert _everything(tmp_path) == ["long.txt"]
    meta = _preprocess(tmp_path / "d", corpus, tiny_tokenizer, valid_fraction=0.0, fast_tokenizer=False)
    assert meta["tokenizer"]["engine"] == "tokenizers"
