"""What a ViT has learned, the three views of Figure 7 of the ViT paper (Dosovitskiy et al., "An
Image is Worth 16x16 Words", arXiv 2010.11929):

- the principal components of the patch-embedding filters (the paper's left panel: the top 28);
- the cosine similarity of each patch's position embedding to every other (centre panel), one
  small heat map per position, laid out on the patch grid;
- the mean attention distance of every head against depth (right panel): for each head, how far
  in pixels a query patch looks, averaged over its attention weights, the queries and the images.
  Small distances are local, convolution-like heads; large ones mix the whole image.

The numbers are plain functions (`patch_embed_components`, `pos_embed_similarity`,
`mean_attention_distance`); `render_inspect` draws them (matplotlib, the `viz` extra) and
`write_inspect` writes the PNGs and an `inspect.json`. A random-init model works too: its
position embeddings are unstructured (learned) and its heads all sit near the uniform distance.
"""
from __future__ import annotations

import io
import json
import math
import os
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import ConfigError, DataError, ImageError, InputShapeError, VitlabError
from .model import VisionTransformer
from .util import atomic_write, atomic_write_text, unwrap_model
from .weights.modeldir import recorded_dataset

NUM_COMPONENTS = 28  # as many as the paper shows
NUM_IMAGES = 64
FILES = {"filters": "patch_embed_pca.png", "pos_embed": "pos_embed_similarity.png",
         "attention_distance": "attention_distance.png", "json": "inspect.json"}


# ---- the numbers -------------------------------------------------------------------------------
@dataclass
class FilterComponents:
    components: np.ndarray  # (k, C, kh, kw), unit norm each, mutually orthogonal, by variance
    variance_ratio: np.ndarray  # (k,) share of the filters' variance along each component
    source: str  # the parameter the filters come from
    note: str  # what the filters are, in words


def principal_components(rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(components (k, F), variance ratio (k,)) of the rows of `rows` (n, F), centred on their
    mean: the top right-singular vectors, by decreasing variance, each with a deterministic sign
    (largest-magnitude entry positive)."""
    if rows.ndim != 2 or rows.shape[0] < 2:
        raise ConfigError(f"principal components need at least 2 rows of features, got shape {rows.shape}")
    x = rows.astype(np.float64) - rows.mean(0, keepdims=True)
    _, s, vt = np.linalg.svd(x, full_matrices=False)  # s descending
    k = min(k, len(s), rows.shape[0] - 1)  # centring n rows leaves at most n - 1 directions
    comps = vt[:k]
    signs = np.sign(comps[np.arange(k), np.abs(comps).argmax(1)])
    comps = comps * np.where(signs == 0, 1, signs)[:, None]
    var = s**2
    return comps, var[:k] / max(var.sum(), 1e-300)


def patch_embed_components(model: VisionTransformer, k: int = NUM_COMPONENTS) -> FilterComponents:
    """The top `k` principal components of the filters that look at pixels.

    Without a conv stem these are the patch projection's filters, `patch_embed.proj.weight` (D, C,
    p, p): each of the D embedding dimensions is one p x p filter over the image. With a conv stem
    the projection reads stem features, not pixels, so its filters are not images: the first stem
    conv's 3x3 filters are used instead, and `note` says so."""
    model = unwrap_model(model)
    pe = model.patch_embed
    if pe.stem is None:
        w, source = pe.proj.weight, "patch_embed.proj.weight"
        note = "principal components of the patch-embedding filters"
    else:
        w, source = pe.stem[0].conv.weight, "patch_embed.stem.0.conv.weight"
        note = (f"conv stem: principal components of the first stem conv's {w.shape[-2]}x{w.shape[-1]} filters "
                f"(the patch projection reads stem features, not pixels)")
    D, C, kh, kw = w.shape
    comps, ratio = principal_components(w.detach().float().cpu().numpy().reshape(D, C * kh * kw), k)
    return FilterComponents(comps.reshape(-1, C, kh, kw), ratio, source, note)  # (k, C*kh*kw) -> (k, C, kh, kw)


def pos_embed_similarity(model: VisionTransformer) -> np.ndarray:
    """(g*g, g, g): tile i is the cosine similarity of patch i's position embedding to every
    patch's, on the config's g x g grid. Prefix (class-token) rows are left out. Learned and fixed
    sin-cos embeddings alike."""
    model = unwrap_model(model)
    g = model.config.grid_size
    with torch.no_grad():
        table = model._pos_embed_for((g, g))[0, model.num_prefix_tokens:].detach().float().cpu()  # (g*g, D)
    e = table / table.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return (e @ e.T).reshape(g * g, g, g).numpy()  # (g*g, g*g) -> (g*g, g, g)


def patch_distances(grid: tuple[int, int], patch_size: int) -> np.ndarray:
    """(N, N) pixel distance between the centres of every two patches of a gh x gw grid (N = gh*gw,
    row-major): patch_size x the euclidean distance on the grid."""
    gh, gw = grid
    rows, cols = np.divmod(np.arange(gh * gw), gw)
    return patch_size * np.hypot(rows[:, None] - rows[None], cols[:, None] - cols[None])


def attention_distance(maps: list[torch.Tensor], grid: tuple[int, int], patch_size: int,
                       num_prefix_tokens: int = 0) -> np.ndarray:
    """(layers, heads) mean attention distance in pixels from captured (B, heads, N, N) maps.

    Patch tokens only: each query patch's weights over the key patches (prefix tokens dropped,
    the rest renormalised to sum to one) weight the pixel distances; the result is averaged over
    query patches and images. Uniform attention gives the mean pairwise patch distance; attention
    to oneself gives 0."""
    gh, gw = grid
    P, n = num_prefix_tokens, gh * gw
    dist = torch.from_numpy(patch_distances(grid, patch_size)).double()  # (n, n)
    out = []
    for layer, attn in enumerate(maps):
        if attn.ndim != 4 or attn.shape[-1] != P + n or attn.shape[-2] != P + n:
            raise InputShapeError(f"attention map {layer} has shape {tuple(attn.shape)}, expected (B, heads, "
                                  f"{P + n}, {P + n}) for {P} prefix token(s) and a {gh}x{gw} patch grid")
        a = attn[:, :, P:, P:].double()  # (B, H, N, N) -> (B, H, n, n)
        a = a / a.sum(-1, keepdim=True).clamp_min(1e-30)
        per_query = (a * dist).sum(-1)  # (B, H, n)
        out.append(per_query.mean(dim=(0, 2)).numpy())  # -> (H,)
    return np.stack(out) if out else np.zeros((0, 0))


@torch.no_grad()
def mean_attention_distance(model: VisionTransformer, images: torch.Tensor, batch_size: int = 32) -> np.ndarray:
    """(depth, heads) mean attention distance in pixels of `model` over `images`, a (B, C, H, W)
    float batch already normalised for the model (see `attention_distance`)."""
    from .attention import capture_attention
    model = unwrap_model(model)
    if images.ndim != 4 or len(images) == 0:
        raise InputShapeError(f"images must be a non-empty (B, C, H, W) batch, got shape {tuple(images.shape)}")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    p = model.config.patch_size
    grid = (images.shape[2] // p, images.shape[3] // p)
    total = None
    try:
        for start in range(0, len(images), batch_size):
            x = images[start:start + batch_size].to(device)
            with capture_attention(model) as maps:
                model(x)
            d = attention_distance(maps, grid, p, model.num_prefix_tokens) * len(x)  # weight by batch size
            total = d if total is None else total + d
    finally:
        model.train(was_training)
    return total / len(images)


# ---- images to look with -----------------------------------------------------------------------
def subset(n_total: int, labels: torch.Tensor, n: int) -> torch.Tensor:
    """Indices of a stratified, seeded subset of `n` of `n_total` items (all of them when n >= n_total)."""
    if n >= n_total:
        return torch.arange(n_total)
    from .data import stratified_split
    return torch.from_numpy(stratified_split(labels.numpy(), n)[1])


def inspect_images(model: VisionTransformer, model_dir: str | os.PathLike | None = None,
                   paths: list[str | os.PathLike] | None = None, data_dir: str | os.PathLike | None = None,
                   n: int = NUM_IMAGES, seed: int = 0) -> tuple[torch.Tensor, str]:
    """(images (n', C, H, W) normalised for `model`, a line saying where they came from).

    Image files or folders in `paths` when given (an explicit choice wins); else a stratified
    subset of the test split of the dataset `model_dir` records; else seeded Gaussian noise, and
    the line says why. Raises DataError when `paths` are given and none of them is a readable image."""
    from .data.augment import EvalTransform
    model = unwrap_model(model)
    cfg = model.config
    transform = EvalTransform(cfg)
    if n < 1:
        raise ConfigError(f"number of images {n} must be >= 1")
    if paths:
        from .data.folders import decode_image
        from .predict import collect_files
        from .util import printable
        files, failed = collect_files(list(paths))
        decoded = []
        for f in files[:n]:
            try:
                decoded.append(decode_image(f, cfg.img_size, cfg.in_chans))
            except ImageError as e:
                failed.append((f, e.reason))
        if not decoded:
            raise DataError("no readable image in " + "; ".join(f"{printable(f)}: {why}" for f, why in failed[:5]))
        x, _ = transform(torch.from_numpy(np.stack(decoded)))
        skipped = f" ({len(failed)} path(s) skipped)" if failed else ""
        return x, f"{len(decoded)} image(s) from {', '.join(printable(p) for p in paths[:3])}" \
                  f"{' ...' if len(paths) > 3 else ''}{skipped}"
    why = "no model directory given"
    if model_dir is not None:
        try:
            data = recorded_dataset(model_dir, model, "test", data_dir)
            keep = subset(len(data), data.labels, n)
            x, _ = transform(data.images[keep])
            return x, f"{len(keep)} images of the {data.name} test split"
        except (VitlabError, OSError) as e:
            why = str(e)
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(n, *cfg.input_size, generator=gen),
            f"{n} images of Gaussian noise: no dataset to take images from ({why})")


# ---- pictures ----------------------------------------------------------------------------------
def pyplot():
    """matplotlib.pyplot on the Agg backend (files only, no display); VitlabError when the `viz`
    extra is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise VitlabError("drawing needs matplotlib: pip install 'vitlab[viz]'") from None
    return plt


def figure_png(fig) -> bytes:
    """The figure as PNG bytes; the figure is closed."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    pyplot().close(fig)
    return buf.getvalue()


def _mosaic(tiles: np.ndarray, cols: int) -> np.ndarray:
    """(n, h, w[, 3]) tiles -> one image, `cols` per row, with 1-pixel NaN gaps (drawn blank)."""
    n, h, w = tiles.shape[:3]
    rows = math.ceil(n / cols)
    out = np.full((rows * (h + 1) - 1, cols * (w + 1) - 1, *tiles.shape[3:]), np.nan)
    for i, t in enumerate(tiles):
        r, c = divmod(i, cols)
        out[r * (h + 1):r * (h + 1) + h, c * (w + 1):c * (w + 1) + w] = t
    return out


def draw_filters(fc: FilterComponents) -> bytes:
    """The components as small images, 7 per row, each stretched to its own min..max."""
    plt = pyplot()
    k, C = fc.components.shape[:2]
    tiles = fc.components.transpose(0, 2, 3, 1) if C == 3 else fc.components[:, 0]  # (k, C, h, w) -> (k, h, w, C)
    lo = tiles.reshape(k, -1).min(1).reshape(k, *[1] * (tiles.ndim - 1))
    hi = tiles.reshape(k, -1).max(1).reshape(k, *[1] * (tiles.ndim - 1))
    tiles = (tiles - lo) / np.maximum(hi - lo, 1e-12)
    cols = min(7, k)
    mosaic = _mosaic(tiles, cols)
    if C == 3:
        mosaic = np.where(np.isnan(mosaic), 1.0, mosaic)  # white gaps
    fig, ax = plt.subplots(figsize=(1.0 * cols + 0.6, 1.0 * math.ceil(k / cols) + 0.9))
    ax.imshow(mosaic, cmap=None if C == 3 else "gray", interpolation="nearest")
    ax.set_axis_off()
    channels = "" if C in (1, 3) else f" (channel 0 of {C})"
    ax.set_title(textwrap.fill(f"{fc.note}{channels}", 70) +
                 f"\ntop {k}, {100 * fc.variance_ratio.sum():.0f}% of the variance", fontsize=8)
    fig.tight_layout()
    return figure_png(fig)


def draw_pos_similarity(sim: np.ndarray) -> bytes:
    """One g x g tile per position, laid out on the g x g grid, colour -1..1."""
    plt = pyplot()
    g = sim.shape[1]
    fig, ax = plt.subplots(figsize=(6, 5.4))
    im = ax.imshow(_mosaic(sim, g), cmap="viridis", vmin=-1, vmax=1, interpolation="nearest")
    ax.set_axis_off()
    ax.set_title("position embedding similarity: tile (row, col) is the cosine similarity\n"
                 "of that patch's embedding to every patch's", fontsize=8)
    fig.colorbar(im, ax=ax, fraction=0.046, label="cosine similarity")
    fig.tight_layout()
    return figure_png(fig)


def draw_attention_distance(dist: np.ndarray, uniform: float, patch_size: int) -> bytes:
    """One point per head at (layer, distance); the dashed line is uniform attention's distance."""
    plt = pyplot()
    L, H = dist.shape
    fig, ax = plt.subplots(figsize=(6, 4))
    for h in range(H):
        ax.scatter(np.arange(1, L + 1), dist[:, h], s=18, label=f"head {h + 1}" if H <= 16 else None)
    ax.axhline(uniform, ls="--", c="grey", lw=1, label="uniform attention")
    ax.set_xlabel("network depth (layer)")
    ax.set_ylabel("mean attention distance (pixels)")
    ax.set_ylim(0, max(uniform * 1.6, float(dist.max()) * 1.1 if dist.size else 1.0))
    ax.set_xticks(range(1, L + 1))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, ncol=max(1, (H + 1) // 8), loc="best")
    ax.set_title(f"mean attention distance per head (patch {patch_size} px)", fontsize=9)
    fig.tight_layout()
    return figure_png(fig)


def inspect_numbers(model: VisionTransformer, images: torch.Tensor) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(JSON-ready summary, the arrays the pictures need) of the three views."""
    model = unwrap_model(model)
    cfg = model.config
    fc = patch_embed_components(model)
    sim = pos_embed_similarity(model)
    dist = mean_attention_distance(model, images)
    grid = (images.shape[2] // cfg.patch_size, images.shape[3] // cfg.patch_size)
    pair = patch_distances(grid, cfg.patch_size)
    uniform = float(pair.mean())
    g = cfg.grid_size
    grid_pair = np.rint(patch_distances((g, g), 1) ** 2).astype(int)  # squared grid distance, exact
    flat = sim.reshape(g * g, g * g)
    by_distance = {f"{math.sqrt(d2):.3f}": float(flat[grid_pair == d2].mean()) for d2 in np.unique(grid_pair)}
    summary = {
        "model": cfg.name, "patch_size": cfg.patch_size, "grid": list(grid), "images": int(len(images)),
        "patch_embed": {"source": fc.source, "note": fc.note, "shape": list(fc.components.shape),
                        "variance_ratio": fc.variance_ratio.tolist()},
        "pos_embed": {"kind": cfg.pos_embed, "grid": g,
                      "mean_similarity_by_grid_distance": by_distance},
        "attention_distance": {"unit": "pixels", "uniform_attention": uniform,
                               "per_layer_per_head": dist.tolist()},
    }
    return summary, {"components": fc, "similarity": sim, "distance": dist, "uniform": uniform}


def render_inspect(model: VisionTransformer, images: torch.Tensor) -> tuple[dict[str, bytes], dict[str, Any]]:
    """({"filters" | "pos_embed" | "attention_distance": PNG bytes}, summary numbers)."""
    summary, arrays = inspect_numbers(model, images)
    pngs = {"filters": draw_filters(arrays["components"]),
            "pos_embed": draw_pos_similarity(arrays["similarity"]),
            "attention_distance": draw_attention_distance(arrays["distance"], arrays["uniform"],
                                                          summary["patch_size"])}
    return pngs, summary


def _written_by_inspect(path: Path) -> bool:
    """Whether `path` is the inspect.json of an earlier run of write_inspect (its files may be replaced)."""
    try:
        if path.is_symlink() or not path.is_file() or path.stat().st_size > 10_000_000:
            return False
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and data.get("written_by") == "vitlab inspect"


def write_inspect(model: VisionTransformer, images: torch.Tensor, out_dir: str | os.PathLike,
                  note: str = "") -> dict[str, Path]:
    """Write patch_embed_pca.png, pos_embed_similarity.png, attention_distance.png and
    inspect.json (the numbers; `note` says where the images came from) to `out_dir`; returns
    {"filters" | "pos_embed" | "attention_distance" | "json": path}."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file, not a folder")
    clash = [out / name for name in FILES.values() if (out / name).exists() or (out / name).is_symlink()]
    if clash and not _written_by_inspect(out / FILES["json"]):
        raise ConfigError(f"{clash[0]} already exists and {out} holds no earlier `vitlab inspect` output; "
                          f"vitlab never replaces other files: choose another --out")
    pngs, summary = render_inspect(model, images)
    summary["images_from"] = note
    summary["written_by"] = "vitlab inspect"
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for key, data in pngs.items():
        paths[key] = atomic_write(out / FILES[key], lambda tmp, data=data: Path(tmp).write_bytes(data))
    paths["json"] = atomic_write_text(out / FILES["json"], json.dumps(summary, indent=2) + "\n")
    return paths


__all__ = ["FilterComponents", "principal_components", "patch_embed_components", "pos_embed_similarity",
           "patch_distances", "attention_distance", "mean_attention_distance",
           "inspect_images", "render_inspect", "write_inspect"]
