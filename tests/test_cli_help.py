"""Every command's --help renders (argparse formats help strings with %: an unescaped percent sign in one
option's help crashes --help with a traceback)."""

import importlib
from pathlib import Path

import pytest

from pipeline.__main__ import COMMANDS

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_pipeline_command_help(command, capsys):
    module = importlib.import_module(COMMANDS[command][0])
    with pytest.raises(SystemExit) as exit_info:
        module.main(["--help"])
    assert exit_info.value.code == 0
    assert "usage:" in capsys.readouterr().out


def test_front_door_names_the_command_in_usage(capsys, monkeypatch):
    """``python -m pipeline train --help`` shows that command, not the script whose parser it shares."""
    from pipeline.__main__ import main

    monkeypatch.setattr("sys.argv", ["/somewhere/pipeline/__main__.py", "train", "--help"])
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert capsys.readouterr().out.startswith("usage: python -m pipeline train ")


@pytest.mark.parametrize("script", ["compare", "host_overhead", "checkpoint_integrity", "decoder_init", "throughput",
                                    "hf_plateau"])
def test_bench_help(script, capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))
    module = importlib.import_module(f"bench.{script}")
    with pytest.raises(SystemExit) as exit_info:
        module.main(["--help"])
    assert exit_info.value.code == 0
    assert "usage:" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [(["bogus"], "usage: bash bench/gpu.sh "),
                                           (["hostlight", "large_b256_bf16autocast", "nosuchrow"],
                                            "hostlight: no row nosuchrow (rows: large_b256_bf16autocast ")])
def test_gpu_script_refuses_unknown_modes_and_rows_before_installing(args, message, tmp_path):
    """bench/gpu.sh checks its mode and hostlight's row names before it installs or starts anything: a typo
    costs no device time."""
    import subprocess

    done = subprocess.run(["bash", str(ROOT / "bench" / "gpu.sh"), *args], cwd=tmp_path, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 2
    assert done.stdout.startswith(message) and done.stdout.count("\n") == 1, done.stdout
    assert not list(tmp_path.iterdir())  # no $OUT folder made
