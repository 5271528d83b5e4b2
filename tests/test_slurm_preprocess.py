"""slurm/preprocess.sh on a throw-away Slurm cluster (tests/slurm_cluster.py): a job array of 3 preprocessing
shards and the dependent merge job produce the documents of one single-process run."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from slurm_cluster import started_cluster_or_skip  # noqa: E402
from pipeline.data.meta import import_indexed_dataset_module, load_meta, split_prefix  # noqa: E402
from pipeline.data.preprocess import PreprocessConfig, preprocess  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    yield from started_cluster_or_skip(tmp_path_factory.mktemp("slurm_preprocess"))


def _documents(prefix):
    out = []
    for split in ("train", "valid"):
        dataset = import_indexed_dataset_module().IndexedDataset(split_prefix(prefix, split))
        out += [tuple(np.asarray(dataset[i]).tolist()) for i in range(len(dataset))]
    return out


def test_job_array_then_dependent_merge(cluster, tmp_path, english_text_file, tiny_tokenizer):
    lines = english_text_file.read_text(encoding="utf-8").splitlines()
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for number, (start, end) in enumerate([(0, 90), (90, 200), (200, len(lines))]):
        (corpus / f"part{number}.txt").write_text("\n".join(lines[start:end]) + "\n", encoding="utf-8")
    output = tmp_path / "data" / "lee"
    output.parent.mkdir()
    env = {"SHARDS": "3", "INPUT": str(corpus / "*.txt"), "TOKENIZER": str(tiny_tokenizer),
           "OUTPUT_PREFIX": str(output), "PREPROCESS_ARGS": "--one-doc-per-line --valid-fraction 0.1",
           "CPUS_PER_TASK": "1", "TIME_LIMIT": "00:10:00", "PYTHON": sys.executable, "PYTHONPATH": str(REPO),
           "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    submitted = cluster.run(str(REPO / "slurm" / "preprocess.sh"), env=env).stdout
    array_id, merge_id = re.search(r"job array (\d+).*merge: job (\d+)", submitted).groups()
    state = cluster.wait_job_finished(merge_id, timeout=600)
    logs = "\n".join(path.read_text(errors="replace") for path in (output.parent / "slurm-logs").glob("*.out"))
    assert state == "COMPLETED", f"merge job {merge_id}: {state}\n{logs}\n{cluster.log_tail()}"
    merged = load_meta(output)
    assert len(merged["merged_from"]) == 3 and [source["path"] for source in merged["sources"]] == \
        [str((corpus / f"part{number}.txt").resolve()) for number in range(3)]

    single = tmp_path / "single" / "lee"
    preprocess(PreprocessConfig(inputs=[str(corpus / "*.txt")], tokenizer=tiny_tokenizer, output_prefix=single,
                                one_doc_per_line=True, valid_fraction=0.1, workers=1, show_progress=False))
    # The same documents in the same splits and order as one run (tests/test_merge.py checks the split per document).
    assert _documents(output) == _documents(single) and merged["splits"] == load_meta(single)["splits"]
    assert os.path.isdir(output.parent / "slurm-logs") and array_id != merge_id
