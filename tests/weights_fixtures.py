"""Fixtures and helpers shared by the hostile-weights tests (test_hostile_weights.py,
test_hostile_convert.py, test_hostile_hf.py): a tiny random model, that model saved as a vitlab
model directory and as a Hugging Face folder, a timm-layout checkpoint, and a CLI runner that
expects one clear error line. conftest.py registers this module as a plugin, so its fixtures are
found by name; the helpers are imported."""
import json

import pytest
from safetensors.torch import save_file

import vitlab
from vitlab.cli import main
from vitlab.weights.hf import to_hf

from conftest import randomize, refusal, tiny_config

FAST_S = 2.0  # a refused size must fail at once, not after allocating


def cli(capsys, *argv: str) -> str:
    """Run `vitlab ARGV`, expect exit 2 with exactly one stderr line and no traceback; that line."""
    return refusal(main([str(a) for a in argv]), capsys.readouterr().err)


def tree(path):
    """{relative path: bytes} of everything under `path`."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture
def model():
    return randomize(vitlab.create_model(tiny_config())).eval()


@pytest.fixture
def saved(tmp_path, model):
    return vitlab.save_model(model, tmp_path / "m")


@pytest.fixture
def ckpt(tmp_path):
    """A timm-layout safetensors checkpoint (vitlab's names are timm's); 64 wide, so one 64-wide head."""
    file = tmp_path / "ckpt.safetensors"
    model = randomize(vitlab.create_model(tiny_config(embed_dim=64, num_heads=1)))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, file)
    return file


@pytest.fixture
def hf_dir(tmp_path, model):
    return to_hf(model, tmp_path / "hf")


def edit_json(file, **changes):
    doc = json.loads(file.read_text())
    doc.update(changes)
    file.write_text(json.dumps(doc))
