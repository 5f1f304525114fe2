"""Looking inside: where a ViT looks, as a map over its patch grid.

Three methods (`explain(model, x, method=...)`):
- **raw**: one layer's attention probabilities (one head, or the mean over heads).
- **rollout** (Abnar & Zuidema, "Quantifying Attention Flow in Transformers", arXiv 2005.00928): each
  layer's head-fused attention (mean, max or min over heads; optionally with the weakest weights
  discarded), mixed with the identity for the residual path and row-normalised, multiplied through
  the layers from the first to the last.
- **gradient**: class-specific, gradient-weighted relevance (Chefer, Gur & Wolf, "Generic
  Attention-model Explainability", arXiv 2103.15679): R starts as the identity and each layer adds
  mean_heads((dy_c/dA * A)^+) @ R, where y_c is the logit of the class explained (`target`, default
  the top-1 class). Unlike the other two it changes with the class asked about.

What a map means depends on how the head reads the tokens:
- class-token models (`pool='token'`): the row of the class token, i.e. how much each patch feeds
  the token the classifier reads;
- average-pooling models (`pool='avg'`): the mean of the patch tokens' rows, i.e. how much each
  patch feeds the average the classifier reads (for raw attention: the attention each patch
  receives, averaged over all patch queries).

Capture works through forward hooks on a block's `attn.probe`; a hooked layer takes the explicit
matmul-softmax-matmul kernel over the same weights, the other layers keep the fast kernel, and
nothing is stored on the model. Each method keeps only what it needs: raw hooks one layer; rollout
folds each layer into a running (B, N, N) product as the forward pass goes; gradient keeps one
head-fused (B, N, N) map per layer. So a ViT-B/16 at 224 px (197 tokens, 12 layers) needs a few
MB per image on top of the forward (and, for gradient, backward) pass.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np
import torch

from .errors import ConfigError, InputShapeError, VitlabError
from .model import VisionTransformer
from .util import unwrap_model

METHODS = ("raw", "rollout", "gradient")
HEAD_FUSIONS = ("mean", "max", "min")


@contextmanager
def capture_attention(model: VisionTransformer, layers: list[int] | None = None,
                      keep_graph: bool = False) -> Iterator[list[torch.Tensor]]:
    """Within the block, each forward appends one (B, heads, N, N) tensor per hooked layer, in
    order, to the yielded list: every layer, or only `layers` (indices into model.blocks, negative
    from the end). fp32 and detached, unless `keep_graph` (then the tensors themselves, for
    gradients with respect to them). The hooks are removed on exit.

        with capture_attention(model) as maps:
            model(x)
        rollout = attention_rollout(maps)
    """
    model = unwrap_model(model)
    maps: list[torch.Tensor] = []

    def keep(mod, inp, out):
        maps.append(out if keep_graph else out.detach().float())

    with _hooks(model, _layer_indices(model, layers), keep):
        yield maps


@contextmanager
def _hooks(model: VisionTransformer, indices: list[int], fn: Callable) -> Iterator[None]:
    handles = [model.blocks[i].attn.probe.register_forward_hook(fn) for i in indices]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _layer_indices(model: VisionTransformer, layers: list[int] | None) -> list[int]:
    depth = len(model.blocks)
    if layers is None:
        return list(range(depth))
    bad = [i for i in layers if not -depth <= i < depth]
    if bad:
        raise ConfigError(f"layer(s) {bad} out of range: the model has {depth} layers (0..{depth - 1}, or "
                          f"-1 for the last)")
    return sorted({i % depth for i in layers})


def fuse_heads(attn: torch.Tensor, fusion: str = "mean") -> torch.Tensor:
    """(B, H, N, N) -> (B, N, N): the mean, max or min over heads."""
    if fusion == "mean":
        return attn.mean(dim=1)
    if fusion == "max":
        return attn.amax(dim=1)
    if fusion == "min":
        return attn.amin(dim=1)
    raise ConfigError(f"head fusion {fusion!r} must be one of {HEAD_FUSIONS}")


def discard_weakest(a: torch.Tensor, ratio: float, keep_columns: int = 0) -> torch.Tensor:
    """(B, N, N) with the `ratio` smallest weights of each map set to 0; the first `keep_columns`
    columns (the class token, which every row attends to) are never discarded."""
    if not 0 <= ratio < 1:
        raise ConfigError(f"discard ratio {ratio} must be in [0, 1)")
    if ratio == 0:
        return a
    B, N, _ = a.shape
    flat = a.clone()
    body = flat[:, :, keep_columns:].reshape(B, -1)  # (B, N, N - k) -> (B, N*(N-k))
    k = int(body.shape[1] * ratio)
    if k:
        idx = body.topk(k, dim=1, largest=False).indices
        body.scatter_(1, idx, 0.0)
    flat[:, :, keep_columns:] = body.reshape(B, N, N - keep_columns)
    return flat


def rollout_step(result: torch.Tensor | None, attn: torch.Tensor, residual: float = 0.5) -> torch.Tensor:
    """One layer of rollout: `attn` (B, N, N) mixed with the identity, row-normalised, times `result`."""
    B, N, _ = attn.shape
    eye = torch.eye(N, dtype=attn.dtype, device=attn.device)
    a = residual * attn + (1 - residual) * eye
    a = a / a.sum(dim=-1, keepdim=True).clamp_min(1e-12)
    return a if result is None else a @ result


def attention_rollout(maps: list[torch.Tensor], residual: float = 0.5, head_fusion: str = "mean",
                      discard_ratio: float = 0.0, keep_columns: int = 0) -> torch.Tensor:
    """(B, N, N) rollout of captured (B, heads, N, N) maps, first layer first: head-fused attention,
    weakest weights discarded, mixed with the identity for the residual path, row-normalised,
    multiplied through the layers. Row 0 (class token) is what a class-token head reads."""
    if not maps:
        raise ValueError("no attention maps: run a forward pass inside capture_attention() first")
    result = None
    for attn in maps:
        a = discard_weakest(fuse_heads(attn.float(), head_fusion), discard_ratio, keep_columns)
        result = rollout_step(result, a, residual)
    return result


def read_out(model: VisionTransformer, m: torch.Tensor) -> torch.Tensor:
    """(B, N, N) token-to-token map -> (B, N_patches): the row(s) the classifier reads (the class
    token's row, or the mean of the patch tokens' rows for average pooling), patch columns only."""
    p = model.num_prefix_tokens
    rows = m[:, 0] if model.config.pool == "token" else m[:, p:].mean(dim=1)
    return rows[:, p:]


def explain(model: VisionTransformer, x: torch.Tensor, method: str = "rollout", *, layer: int = -1,
            head: int | None = None, head_fusion: str = "mean", discard_ratio: float = 0.0,
            target: torch.Tensor | int | None = None, normalize: bool = True
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """(maps, logits) for a (B, C, H, W) batch of model inputs: maps is (B, h, w) over the patch grid
    (scaled to [0, 1] per image when `normalize`, else the method's raw values), logits (B, classes).

    raw uses `layer` and `head` (None: the mean over heads); rollout uses `head_fusion` and
    `discard_ratio`; gradient explains `target` (a class index, one per image, or None for each
    image's top-1 class). The model runs in eval mode and fp32 on its own device."""
    model = unwrap_model(model)
    if method not in METHODS:
        raise ConfigError(f"method {method!r} must be one of {METHODS}")
    if head_fusion not in HEAD_FUSIONS:
        raise ConfigError(f"head fusion {head_fusion!r} must be one of {HEAD_FUSIONS}")
    heads = model.config.num_heads
    if head is not None and not 0 <= head < heads:
        raise ConfigError(f"head {head} out of range: the model has {heads} heads (0..{heads - 1})")
    if method == "gradient" and model.config.num_classes == 0:
        raise ConfigError("the gradient method needs a classifier head; this model has num_classes=0")
    grid = model._check_input(x)
    if not 0 <= discard_ratio < 1:
        raise ConfigError(f"discard ratio {discard_ratio} must be in [0, 1)")
    was_training = model.training
    model.eval()
    try:
        if method == "gradient":
            maps, logits = _gradient(model, x, target)
        else:
            maps, logits = (_raw if method == "raw" else _rollout)(model, x, layer, head, head_fusion,
                                                                   discard_ratio)
    finally:
        model.train(was_training)
    maps = maps.reshape(x.shape[0], *grid)  # (B, h*w) -> (B, h, w)
    if normalize:
        lo = maps.flatten(1).amin(1)[:, None, None]
        hi = maps.flatten(1).amax(1)[:, None, None]
        maps = (maps - lo) / (hi - lo).clamp_min(1e-12)
    return maps, logits


@torch.no_grad()
def _raw(model, x, layer, head, head_fusion, discard_ratio):
    with capture_attention(model, [layer]) as maps:
        logits = model(x).float()
    attn = maps[0]  # (B, H, N, N)
    a = attn[:, head] if head is not None else attn.mean(dim=1)
    return read_out(model, a), logits


@torch.no_grad()
def _rollout(model, x, layer, head, head_fusion, discard_ratio):
    state: dict[str, torch.Tensor | None] = {"result": None}

    def fold(mod, inp, out):  # one running (B, N, N) product instead of every layer's maps
        a = discard_weakest(fuse_heads(out.detach().float(), head_fusion), discard_ratio,
                            model.num_prefix_tokens)
        state["result"] = rollout_step(state["result"], a)

    with _hooks(model, list(range(len(model.blocks))), fold):
        logits = model(x).float()
    return read_out(model, state["result"]), logits


def _gradient(model, x, target):
    fused: list[torch.Tensor | None] = [None] * len(model.blocks)
    kept: list[torch.Tensor] = []

    def keep(mod, inp, out):
        kept.append(out)

    with torch.enable_grad(), _hooks(model, list(range(len(model.blocks))), keep):
        x = x.detach().float().requires_grad_(True)  # so the attention maps are part of a graph
        logits = model(x).float()
        B = logits.shape[0]
        if target is None:
            target = logits.argmax(-1)
        target = torch.as_tensor(target, device=logits.device).long().flatten()
        if target.numel() not in (1, B):
            raise ConfigError(f"{target.numel()} target classes for {B} images: give one, or one per image")
        target = target.expand(B)
        bad = target[(target < 0) | (target >= logits.shape[1])]
        if len(bad):
            raise ConfigError(f"class {bad[0].item()} out of range: the model has {logits.shape[1]} classes")
        score = logits.gather(1, target[:, None]).sum()  # each image's own target logit
        grads = torch.autograd.grad(score, kept)
    for i, (a, g) in enumerate(zip(kept, grads)):
        fused[i] = (g.float() * a.detach().float()).clamp_min(0).mean(dim=1)  # (B, H, N, N) -> (B, N, N)
    N = fused[0].shape[-1]
    R = torch.eye(N, device=logits.device).expand(B, N, N)
    for a in fused:
        R = R + a @ R
    return read_out(model, R), logits.detach()


def pointing_game(maps: torch.Tensor, targets: torch.Tensor) -> float:
    """Share of (B, h, w) maps whose maximum falls on the target patch (B, flat index into h*w).
    Ties count only when the target is among the maxima and the map is not flat: a uniform map
    points nowhere and scores 0."""
    flat = maps.flatten(1)
    top = flat.amax(1, keepdim=True)
    hit = flat.gather(1, targets.long()[:, None]).squeeze(1) >= top.squeeze(1)
    flat_map = (flat.amin(1) == top.squeeze(1))
    return (hit & ~flat_map).float().mean().item()


def _matplotlib():
    """matplotlib on the Agg backend (files only); VitlabError when the `viz` extra is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot  # noqa: F401  (registers the colormaps and pyplot)
    except ImportError:
        raise VitlabError("pictures need matplotlib: pip install 'vitlab[viz]' (or use --format npy)") from None
    return matplotlib


def heatmap_rgb(heat: np.ndarray, cmap: str = "inferno") -> np.ndarray:
    """(h, w) values in [0, 1] -> (h, w, 3) uint8 colours of a matplotlib colormap."""
    colormaps = _matplotlib().colormaps
    return (colormaps[cmap](np.clip(heat, 0, 1))[..., :3] * 255).round().astype(np.uint8)


def overlay(image: np.ndarray, heat: np.ndarray | torch.Tensor, alpha: float = 0.5,
            cmap: str = "inferno") -> np.ndarray:
    """(C, H, W) uint8 image (1 or 3 channels) and an (h, w) map in [0, 1] -> (H, W, 3) uint8:
    the map upsampled to the image (bilinear), coloured, and blended over it."""
    if image.ndim != 3 or image.shape[0] not in (1, 3):
        raise InputShapeError(f"image has shape {image.shape}; expected (1 or 3, H, W) uint8")
    heat = torch.as_tensor(np.asarray(heat, dtype=np.float32))
    if heat.ndim != 2:
        raise InputShapeError(f"map has shape {tuple(heat.shape)}; expected (h, w)")
    H, W = image.shape[1:]
    up = torch.nn.functional.interpolate(heat[None, None], size=(H, W), mode="bilinear", align_corners=False)
    colours = heatmap_rgb(up[0, 0].numpy(), cmap).astype(np.float32)
    rgb = np.repeat(image, 3, axis=0) if image.shape[0] == 1 else image
    rgb = rgb.transpose(1, 2, 0).astype(np.float32)  # (3, H, W) -> (H, W, 3)
    return (alpha * colours + (1 - alpha) * rgb).round().clip(0, 255).astype(np.uint8)


def explain_files(model: VisionTransformer, paths: list, method: str = "rollout", *, target: int | None = None,
                  batch_size: int = 16, **options) -> tuple[list[dict], list[tuple]]:
    """Attention maps for image files or folders, read and checked exactly as `vitlab predict` reads
    them. ([{"file", "image" (C, H, W) uint8, "map" (h, w) raw values, "probs" (classes,)}], [(file,
    problem)]); `options` go to explain()."""
    from .data.augment import EvalTransform
    from .predict import collect_files, decode_files
    cfg = model.config
    files, failed = collect_files(paths)
    transform = EvalTransform(cfg)
    device = next(model.parameters()).device
    rows = []
    for start in range(0, len(files), batch_size):
        chunk, unreadable = decode_files(files[start:start + batch_size], cfg)
        failed += unreadable
        if not chunk:
            continue
        images = np.stack([a for _, a in chunk])
        x, _ = transform(torch.from_numpy(images))
        maps, logits = explain(model, x.to(device), method, target=target, normalize=False, **options)
        probs = logits.float().softmax(-1).cpu()
        for (f, image), m, p in zip(chunk, maps.cpu(), probs):
            rows.append({"file": f, "image": image, "map": m.numpy(), "probs": p.numpy()})
    return rows, failed


def class_index(cfg, cls: str) -> int:
    """The class that `cls` names: a class name of the model, else an index in [0, num_classes)."""
    from .util import printable
    names = cfg.label_names
    if cls in names:
        return names.index(cls)
    if cls.lstrip("-").isdigit() and 0 <= int(cls) < cfg.num_classes:
        return int(cls)
    raise ConfigError(f"class {printable(cls)!r} (--class) is neither a class name nor an index in [0, {cfg.num_classes}); "
                      f"classes: {', '.join(map(printable, names[:10]))}" + (" ..." if len(names) > 10 else ""))


def write_explanations(model: VisionTransformer, files: list, out, method: str = "rollout", *,
                       target: int | None = None, batch_size: int = 16, fmt: str = "png", alpha: float = 0.5,
                       **options) -> tuple[list[dict], list[tuple]]:
    """Explain image `files` a batch at a time (memory stays bounded) and write one PNG (the image, the
    map over it, the predicted class) or .npy map per image into `out`, created when the first is ready,
    under output_paths()' names (nothing in `out` is ever replaced). A file named twice is explained once.
    Returns ([{"file", "out", "label", "index", "prob", "explained"}] in file order, [(file, problem)])."""
    from pathlib import Path

    from .util import printable
    out = Path(out)
    cfg = model.config
    names = cfg.label_names
    files = list(dict.fromkeys(files))
    targets = output_paths(files, out, method, fmt)
    what = {"raw": f"raw attention, layer {options.get('layer', -1)}, "
                   + (f"head {options['head']}" if options.get("head") is not None else "mean of heads"),
            "rollout": f"rollout ({options.get('head_fusion', 'mean')} of heads, discard "
                       f"{options.get('discard_ratio', 0.0):g})"}
    index, failed = [], []
    for start in range(0, len(files), batch_size):
        rows, bad = explain_files(model, files[start:start + batch_size], method, target=target,
                                  batch_size=batch_size, **options)
        failed += bad
        if rows:
            out.mkdir(parents=True, exist_ok=True)
        for row in rows:
            top = int(row["probs"].argmax())
            explained = top if target is None else target
            dest = targets[row["file"]]
            if fmt == "png":
                how = what.get(method) or f"gradient x attention for {printable(names[explained])}"
                title = f"{printable(row['file'].name)}: {printable(names[top])} ({row['probs'][top]:.1%})\n{how}"
                save_figure(dest, row["image"], row["map"], title, alpha)
            else:
                np.save(dest, row["map"].astype(np.float32))
            index.append({"file": str(row["file"]), "out": dest.name, "label": names[top], "index": top,
                          "prob": float(row["probs"][top]), "explained": explained if method == "gradient" else None})
    return index, failed


def output_paths(files: list, out, method: str, fmt: str, index: str = "attention.json") -> dict:
    """{file: out/<stem>.<method>.<fmt>}: names from the file names, made safe and unique. Raises
    ConfigError, before anything is written, if any of them (or `index`) exists already: nothing in
    `out` is ever replaced."""
    from pathlib import Path

    from .util import printable
    out = Path(out)
    targets, taken = {}, set()
    for f in files:
        stem = "".join(c if c.isalnum() or c in "-_." else "_" for c in Path(f).stem)[:100] or "image"
        stem = "_" + stem[1:] if stem.startswith(".") else stem  # no hidden files
        name, n = stem, 1
        while name in taken:
            n += 1
            name = f"{stem}-{n}"
        taken.add(name)
        targets[f] = out / f"{name}.{method}.{fmt}"
    clash = [str(t) for t in targets.values() if t.exists() or t.is_symlink()]
    clash += [str(out / index)] if (out / index).exists() or (out / index).is_symlink() else []
    if clash:
        raise ConfigError(f"{len(clash)} output file(s) already exist, e.g. {printable(clash[0])}; "
                          f"vitlab never replaces files: choose another --out or remove them")
    return targets


def save_figure(path, image: np.ndarray, heat: np.ndarray, title: str, alpha: float = 0.5) -> None:
    """A PNG: the image, and the map (scaled to [0, 1]) blended over it, under one title."""
    plt = _matplotlib().pyplot
    heat = np.asarray(heat, dtype=np.float32)
    span = float(heat.max() - heat.min())
    scaled = (heat - heat.min()) / span if span > 0 else np.zeros_like(heat)
    rgb = np.repeat(image, 3, axis=0) if image.shape[0] == 1 else image
    fig, axes = plt.subplots(1, 2, figsize=(6, 3.4))
    for ax, picture, label in ((axes[0], rgb.transpose(1, 2, 0), "image"),
                               (axes[1], overlay(image, scaled, alpha), "attention")):
        ax.imshow(picture, interpolation="nearest")
        ax.set_title(label, fontsize=9)
        ax.axis("off")
    fig.suptitle(title, fontsize=9, parse_math=False)  # class names are data, not TeX
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
