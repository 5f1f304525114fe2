import json
import subprocess
import sys

import pytest

from vitlab.cli import build_parser, main


def run(*args):
    return subprocess.run([sys.executable, "-m", "vitlab", *args], capture_output=True, text=True)


def test_help_lists_every_subcommand():
    r = run("--help")
    assert r.returncode == 0
    sub = build_parser()._subparsers._group_actions[0]
    assert set(sub.choices) >= {"models", "convert"}
    for name in sub.choices:
        assert name in r.stdout


@pytest.mark.parametrize("name", ["models", "convert"])
def test_each_subcommand_has_help(name, capsys):
    with pytest.raises(SystemExit) as e:
        main([name, "--help"])
    assert e.value.code == 0
    assert "usage: vitlab " + name in capsys.readouterr().out


def test_models_lists_presets_with_parameter_counts(capsys):
    assert main(["models", "base_patch16", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["vit_base_patch16_224"]["params"] == 86_567_656
    assert "vit_tiny_patch4_32" not in rows


def test_usage_errors_exit_non_zero():
    r = run("convert", "x.pth", "--from", "onnx", "--out", "y")
    assert r.returncode == 2 and "invalid choice: 'onnx'" in r.stderr
    r = run("frobnicate")
    assert r.returncode == 2
