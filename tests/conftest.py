import gzip
import os
import re
import struct
from pathlib import Path

import numpy as np

import pytest
import torch

from vitlab import ViTConfig

# Tests share 2 cores with everything else: keep torch from oversubscribing them.
# VITLAB_TEST_THREADS lowers it further, e.g. to 1 beside a timing run that must keep its cores.
torch.set_num_threads(int(os.environ.get("VITLAB_TEST_THREADS", min(2, os.cpu_count() or 1))))

SHARED = Path(__file__).resolve().parents[1].parent / "shared"

CLI_ERROR = re.compile(r"vitlab [a-z]+: error: \S")


def refusal(rc: int, err: str, *needles: str) -> str:
    """Assert that a `vitlab` command refused as the CLI must: exit code 2 and exactly one stderr line,
    `vitlab COMMAND: error: ...` (so no traceback), naming every needle. Returns that line."""
    assert rc == 2, err
    assert err.count("\n") == 1 and CLI_ERROR.match(err), err
    for needle in needles:
        assert needle in err, err
    return err


# Fixtures of the hostile-weights tests (three modules): a tiny model, saved three ways.
pytest_plugins = ["weights_fixtures"]


def tiny_config(**kw) -> ViTConfig:
    """A few-thousand-parameter ViT on 16-px images; fields overridable."""
    base = dict(img_size=16, patch_size=4, in_chans=3, num_classes=5, embed_dim=32, depth=2, num_heads=2)
    base.update(kw)
    chans = base["in_chans"]
    base.setdefault("mean", (0.5,) * chans)
    base.setdefault("std", (0.5,) * chans)
    return ViTConfig(**base)


# The layouts every interop test runs over: timm's defaults and vitlab's small-image flavour.
LAYOUTS = {
    "token-learn": {},
    "avg-fcnorm-nocls": dict(class_token=False, pool="avg"),
    "avg-cls": dict(pool="avg"),
    "layerscale-noqkvbias": dict(init_values=0.1, qkv_bias=False, mlp_ratio=2.0),
}


@pytest.fixture
def rng_input():
    def make(cfg: ViTConfig, batch: int = 2, seed: int = 0) -> torch.Tensor:
        return torch.randn(batch, *cfg.input_size, generator=torch.Generator().manual_seed(seed))
    return make


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every parameter random values (zero-init heads would hide mapping mistakes)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model


def write_shapes(root: Path, classes, per_class: int) -> Path:
    """An image folder of 16-px stripe / dot patterns on noise, `per_class` PNGs in each of three
    class folders (rows, columns, dots): learnable in seconds. Seeded: the same files each call."""
    from PIL import Image
    rng = np.random.default_rng(0)
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            img = rng.integers(0, 60, (16, 16, 3)).astype(np.uint8)
            if c == 0:
                img[rng.integers(2, 14)::5, :, :] += 150
            elif c == 1:
                img[:, rng.integers(2, 14)::5, :] += 150
            else:
                img[rng.integers(0, 4)::4, rng.integers(0, 4)::4, :] += 150
            Image.fromarray(img).save(root / name / f"{i}.png")
    return root


def idx_bytes(arr: np.ndarray) -> bytes:
    """An array as an uint8 IDX file (MNIST's format): magic, dims, data."""
    return bytes([0, 0, 8, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.astype(np.uint8).tobytes()


def write_mnist_like(folder, n_train=60, n_test=20, gz=True, prefix_test="t10k", classes=10):
    """An MNIST-layout folder of random 28-px images, label i % classes (seeded: same bytes each call)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", n_train), (prefix_test, n_test)):
        imgs = rng.integers(0, 256, (n, 28, 28))
        labs = np.arange(n) % classes
        for kind, arr in (("images-idx3", imgs), ("labels-idx1", labs)):
            data = idx_bytes(arr)
            name = f"{prefix}-{kind}-ubyte" + (".gz" if gz else "")
            (folder / name).write_bytes(gzip.compress(data) if gz else data)


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory):
    """Tests (and the vitlab processes they start) never read or write the user's cache: autotune
    results measured under test load would otherwise be reused by the user's real runs."""
    old = os.environ.get("VITLAB_CACHE")
    os.environ["VITLAB_CACHE"] = str(tmp_path_factory.mktemp("vitlab-cache"))
    yield
    if old is None:
        os.environ.pop("VITLAB_CACHE", None)
    else:
        os.environ["VITLAB_CACHE"] = old
