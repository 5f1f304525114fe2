"""`vitlab convert --out` never loses anything (issue 8 item 2): --out that is, holds or sits inside
the source is refused even with --force; a non-empty folder needs --force and --force replaces only a
vitlab model directory, whole; a convert that fails or is interrupted leaves --out as it was."""
import pytest

import vitlab
from vitlab import ModelFileError
from vitlab.cli import main
from vitlab.weights.convert import convert

from conftest import tiny_config
from weights_fixtures import cli, tree


def test_convert_out_equal_to_the_hf_source_is_refused(capsys, hf_dir):
    before = tree(hf_dir)
    err = cli(capsys, "convert", hf_dir, "--from", "hf", "--out", hf_dir)
    assert "is the source" in err
    assert tree(hf_dir) == before
    cli(capsys, "convert", hf_dir, "--from", "hf", "--out", hf_dir, "--force")  # not even with --force
    assert tree(hf_dir) == before


def test_convert_out_inside_the_source_is_refused(capsys, hf_dir):
    before = tree(hf_dir)
    assert "is inside the source" in cli(capsys, "convert", hf_dir, "--from", "hf", "--out", hf_dir / "sub")
    assert tree(hf_dir) == before and not (hf_dir / "sub").exists()


def test_convert_out_around_the_source_is_refused_even_with_force(capsys, tmp_path, ckpt):
    """--out is the folder holding the checkpoint: replacing it would delete the source."""
    before = tree(tmp_path)
    assert "contains the source" in cli(capsys, "convert", ckpt, "--from", "timm", "--out", tmp_path, "--force")
    assert tree(tmp_path) == before


def test_convert_out_symlink_to_the_source_is_refused(capsys, tmp_path, hf_dir):
    (tmp_path / "link").symlink_to(hf_dir)
    before = tree(hf_dir)
    assert "is the source" in cli(capsys, "convert", hf_dir, "--from", "hf", "--out", tmp_path / "link", "--force")
    assert tree(hf_dir) == before


def test_convert_into_a_non_empty_folder_needs_force(capsys, tmp_path, ckpt):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    err = cli(capsys, "convert", ckpt, "--from", "timm", "--out", out)
    assert "not empty" in err and "--force" in err
    assert tree(out) == {"notes.txt": b"mine"}


def test_force_replaces_only_a_model_directory(capsys, tmp_path, ckpt):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "config.json").write_text("{}")
    assert "not a vitlab model directory" in cli(capsys, "convert", ckpt, "--from", "timm", "--out", out, "--force")
    assert (out / "notes.txt").read_text() == "mine"


def test_force_replaces_a_model_directory_whole(tmp_path, ckpt):
    out = vitlab.save_model(vitlab.create_model(tiny_config(depth=3)), tmp_path / "out")
    assert main(["convert", str(ckpt), "--from", "timm", "--out", str(out), "--force"]) == 0
    assert vitlab.load_model(out).config.depth == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.safetensors", "out"]  # no temp dirs left


def test_convert_over_a_model_directory_without_force_is_refused(capsys, tmp_path, ckpt):
    out = vitlab.save_model(vitlab.create_model(tiny_config(depth=3)), tmp_path / "out")
    before = tree(out)
    cli(capsys, "convert", ckpt, "--from", "timm", "--out", out)
    assert tree(out) == before


def test_convert_out_that_is_a_file_is_refused(capsys, tmp_path, ckpt):
    (tmp_path / "out").write_text("mine")
    assert "not a directory" in cli(capsys, "convert", ckpt, "--from", "timm", "--out", tmp_path / "out", "--force")
    assert (tmp_path / "out").read_text() == "mine"


def test_convert_into_an_empty_folder_works(tmp_path, ckpt):
    (tmp_path / "out").mkdir()
    assert main(["convert", str(ckpt), "--from", "timm", "--out", str(tmp_path / "out")]) == 0
    assert vitlab.load_model(tmp_path / "out").config.depth == 2


def test_a_failed_forced_convert_keeps_the_old_model(tmp_path, ckpt, monkeypatch):
    out = vitlab.save_model(vitlab.create_model(tiny_config(depth=3)), tmp_path / "out")
    before = tree(out)

    def disk_full(*a, **k):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr("vitlab.weights.modeldir.save_file", disk_full)
    with pytest.raises(OSError, match="No space"):
        convert(ckpt, "timm", out, force=True)
    assert tree(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.safetensors", "out"]


def test_convert_writes_the_directory_whole_or_not_at_all(tmp_path, ckpt, monkeypatch):
    """A convert that dies after the weights but before the config leaves no half model at --out."""
    import vitlab.weights.modeldir as modeldir

    def die(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(modeldir, "atomic_write_text", die)
    with pytest.raises(KeyboardInterrupt):
        convert(ckpt, "timm", tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.safetensors"]


def test_convert_never_replaces_an_out_filled_while_it_ran(tmp_path, ckpt, monkeypatch):
    """--out was empty when checked, then another process wrote into it: without --force, the
    final rename refuses instead of replacing the other process's files."""
    import vitlab.weights.convert as conv
    real_save = conv.save_model

    def save_then_race(model, path, extra=None):
        real_save(model, path, extra=extra)
        (tmp_path / "out").mkdir(exist_ok=True)
        (tmp_path / "out" / "theirs.txt").write_text("theirs")
    monkeypatch.setattr(conv, "save_model", save_then_race)
    with pytest.raises(ModelFileError, match="Nothing was replaced"):
        convert(ckpt, "timm", tmp_path / "out")
    assert tree(tmp_path / "out") == {"theirs.txt": b"theirs"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.safetensors", "out"]


@pytest.mark.parametrize("args, words", [(["--num-heads", "0"], "num_heads=0"),
                                         (["--num-heads", "3"], "not divisible by num_heads=3"),
                                         (["--img-size", "-1"], "img_size=-1"),
                                         (["--img-size", "0"], "img_size=0"),
                                         (["--preset", "nonsense"], "unknown model 'nonsense'")])
def test_convert_bad_arguments(capsys, tmp_path, ckpt, args, words):
    assert words in cli(capsys, "convert", ckpt, "--from", "timm", "--out", tmp_path / "o", *args)
    assert not (tmp_path / "o").exists()
