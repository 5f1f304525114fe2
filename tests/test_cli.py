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
    for name in SUBCOMMANDS:
        assert name in r.stdout


SUBCOMMANDS = sorted(build_parser()._subparsers._group_actions[0].choices)


def test_the_subcommand_table():
    assert SUBCOMMANDS == ["convert", "data", "eval", "models", "predict", "train"]


@pytest.mark.parametrize("name", SUBCOMMANDS)
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


def test_data_verify_exits_non_zero_on_a_bad_file(tmp_path):
    import shutil
    from conftest import SHARED
    if not (SHARED / "datasets" / "mnist").is_dir():
        pytest.skip("../shared/datasets not present")
    shutil.copytree(SHARED / "datasets" / "mnist", tmp_path / "mnist")
    ok = run("data", "verify", "mnist", "--data-dir", str(tmp_path))
    assert ok.returncode == 0 and "4 of 4 files verified" in ok.stdout
    f = tmp_path / "mnist" / "train-labels-idx1-ubyte.gz"
    f.write_bytes(f.read_bytes()[:-1])
    bad = run("data", "verify", "mnist", "--data-dir", str(tmp_path))
    assert bad.returncode == 1
    assert "BAD train-labels-idx1-ubyte.gz" in bad.stdout and "expected d53e105ee54ea40749a09fcbcd1e9432" in bad.stdout
    assert "3 of 4 files verified" in bad.stdout


def test_data_list_and_unknown_name(tmp_path, monkeypatch):
    r = run("data", "list", "--data-dir", str(tmp_path))
    assert r.returncode == 0 and "cifar100" in r.stdout and "searched:" in r.stdout
    r = run("data", "verify", "imagenet", "--data-dir", str(tmp_path))
    assert r.returncode == 2 and "unknown dataset 'imagenet'" in r.stderr and "Traceback" not in r.stderr
