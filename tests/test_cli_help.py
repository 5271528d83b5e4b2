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
