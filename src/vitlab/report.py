"""`vitlab report RUN`: one self-contained HTML page about a run, readable offline on a phone or a
desktop. Every picture is an inline base64 PNG, the CSS is inline, there is no script and no
external address, so the file can be mailed or archived alone.

Sections (each a `<section id=...>`, see SECTIONS): the resolved config and the model config, the
machine and versions, the loss / accuracy / learning-rate curves, and, from one evaluation of the
run's model on a split of its dataset, per-class accuracy, the confusion matrix, a reliability
diagram with its ECE (Guo et al., arXiv 1706.04599, evaluate.py's bins), the most confident
mistakes with their attention rollout (vitlab.attention), and the ViT paper's Figure 7 views
(vitlab.inspect). Whatever cannot be shown (no model yet, dataset not found, no matplotlib) is
said in its section; the page is still written. Every string read from a file is HTML-escaped.
"""
from __future__ import annotations

import base64
import datetime
import html
import io
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .data.augment import EvalTransform, to_float, to_model_input
from .engine.log import curve_figure, read_metrics, train_accuracy_series
from .engine.runtime import setup_runtime
from .errors import ConfigError, RunDirError, VitlabError
from .evaluate import reliability_bins, save_confusion_png
from .inspect import NUM_IMAGES, figure_png, inspect_images, pyplot, render_inspect, subset
from .util import atomic_write_text
from .weights.modeldir import load_model, recorded_dataset

SECTIONS = {"config": "Configuration", "machine": "Machine and versions", "curves": "Training curves",
            "per-class": "Per-class accuracy", "confusion": "Confusion matrix",
            "calibration": "Calibration (reliability diagram)", "mistakes": "Most confident mistakes",
            "inspect": "Inside the model (ViT paper, Figure 7)"}
EVAL_SECTIONS = ("per-class", "confusion", "calibration", "mistakes")

CSS = """
:root { color-scheme: light; }
* { box-sizing: border-box; }
body { margin: 0; background: #f5f6f8; color: #1c2024;
       font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
main { max-width: 1100px; margin: 0 auto; padding: 12px; }
header h1 { font-size: 1.4em; margin: 8px 0 4px; word-break: break-word; }
nav { display: flex; flex-wrap: wrap; gap: 4px 12px; font-size: 0.9em; }
nav a { color: #1d4ed8; text-decoration: none; }
section { background: #fff; border: 1px solid #dde1e6; border-radius: 8px; padding: 10px 14px; margin: 14px 0; }
h2 { font-size: 1.15em; margin: 4px 0 10px; }
h3 { font-size: 1em; margin: 12px 0 6px; }
img { max-width: 100%; height: auto; }
.pix { image-rendering: pixelated; }
.scroll { overflow-x: auto; -webkit-overflow-scrolling: touch; max-width: 100%; }
.tall { max-height: 520px; overflow-y: auto; }
table { border-collapse: collapse; font-size: 13px; }
th, td { border-bottom: 1px solid #e6e8eb; padding: 3px 8px; text-align: left; vertical-align: top; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
pre { background: #f3f4f6; padding: 8px; font-size: 12px; overflow-x: auto; margin: 0; }
code { font-size: 12px; word-break: break-all; }
.figs { display: grid; grid-template-columns: repeat(auto-fill, minmax(min(320px, 100%), 1fr)); gap: 12px; }
.figs figure, .row figure { margin: 0; }
.row { display: flex; flex-wrap: wrap; gap: 12px; align-items: flex-start; }
.row > figure { flex: 1 1 320px; min-width: 0; }
.row > .scroll { flex: 0 1 auto; }
.medium { max-width: min(620px, 100%); }
figcaption { font-size: 0.85em; color: #555; }
.cards { display: grid; grid-template-columns: repeat(auto-fill, minmax(min(220px, 100%), 1fr)); gap: 10px; }
.card { border: 1px solid #e6e8eb; border-radius: 6px; padding: 6px; font-size: 0.85em; }
.pair { display: grid; grid-template-columns: 1fr 1fr; gap: 4px; }
.pair img { width: 100%; }
.note { color: #6b7280; font-size: 0.9em; }
.bar { display: inline-block; height: 9px; background: #3b82f6; vertical-align: middle; }
.kv { display: flex; flex-wrap: wrap; gap: 4px 18px; }
"""


# ---- small HTML helpers ------------------------------------------------------------------------
def esc(value: Any) -> str:
    """Any value as escaped HTML text (quotes included: safe inside attributes too)."""
    return html.escape(str(value), quote=True)


def png_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def img_tag(data: bytes, alt: str, cls: str = "", width: int | None = None) -> str:
    extra = (f' class="{cls}"' if cls else "") + (f' width="{width}"' if width else "")
    return f'<img src="{png_uri(data)}" alt="{esc(alt)}"{extra}>'


def note(text: str) -> str:
    return f'<p class="note">{esc(text)}</p>'


def table(header: list[str], rows: list[list[str]], numeric: set[int] = frozenset(), tall: bool = False) -> str:
    """An HTML table in a horizontally scrolling wrapper; cells are already-escaped HTML."""
    def cell(tag: str, i: int, v: str) -> str:
        return f'<{tag} class="num">{v}</{tag}>' if i in numeric else f"<{tag}>{v}</{tag}>"
    head = "".join(cell("th", i, esc(h)) for i, h in enumerate(header))
    body = "".join("<tr>" + "".join(cell("td", i, v) for i, v in enumerate(r)) + "</tr>" for r in rows)
    wrap = "scroll tall" if tall else "scroll"
    return f'<div class="{wrap}"><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'


def value_html(v: Any) -> str:
    """A config or env value: scalars as text, lists and mappings as compact JSON."""
    if isinstance(v, (dict, list, tuple)):
        return f"<code>{esc(json.dumps(v, default=str))}</code>"
    return esc(v)


def pixels_png(rgb: np.ndarray, min_side: int = 112) -> bytes:
    """(H, W, 3) or (H, W) uint8 -> PNG bytes, enlarged by an integer factor (nearest neighbour)
    so that small images stay sharp in any viewer."""
    from PIL import Image
    f = max(1, -(-min_side // max(rgb.shape[:2])))
    big = rgb.repeat(f, 0).repeat(f, 1)
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(big)).save(buf, format="PNG")
    return buf.getvalue()


# ---- reading the run ---------------------------------------------------------------------------
def _read_json(path: Path) -> tuple[Any, str | None]:
    if not path.is_file():
        return None, f"{path.name} is missing"
    try:
        return json.loads(path.read_text(errors="replace")), None
    except ValueError as e:
        return None, f"{path.name} is not valid JSON ({str(e)[:80]})"


def _model_dir(run: Path) -> Path | None:
    if (run / "model" / "config.json").is_file():
        return run / "model"
    if (run / "config.json").is_file() and (run / "model.safetensors").is_file():  # a model directory itself
        return run
    return None


# ---- evaluation --------------------------------------------------------------------------------
@torch.no_grad()
def predict_split(model, data, rt, batch_size: int = 256) -> dict[str, torch.Tensor]:
    """Per image: top-1 confidence, predicted class, probability of the true class (all on CPU)."""
    transform = EvalTransform(model.config)
    model.eval()
    conf, pred, p_true = [], [], []
    for start in range(0, len(data), batch_size):
        x, _ = transform(data.images[start:start + batch_size])
        y = data.labels[start:start + batch_size]
        with rt.autocast():
            probs = model(x.to(rt.device)).float().softmax(-1).cpu()
        c, p = probs.max(-1)
        conf.append(c)
        pred.append(p)
        p_true.append(probs.gather(1, y[:, None])[:, 0])
    return {"conf": torch.cat(conf), "pred": torch.cat(pred), "p_true": torch.cat(p_true)}


def split_metrics(out: dict[str, torch.Tensor], labels: torch.Tensor, num_classes: int) -> dict[str, Any]:
    """top-1, loss, per-class accuracy and count, confusion (rows true), reliability bins + ECE."""
    K, y = num_classes, labels
    confusion = torch.bincount(y * K + out["pred"], minlength=K * K).reshape(K, K)
    per_n = confusion.sum(1)
    correct = out["pred"] == y
    return {"n": len(y), "top1": correct.double().mean().item(),
            "loss": -out["p_true"].double().clamp_min(1e-12).log().mean().item(),
            "per_class": (confusion.diag().double() / per_n.clamp_min(1)).tolist(), "per_class_n": per_n.tolist(),
            "confusion": confusion.tolist(), "reliability": reliability_bins(out["conf"], correct)}


def draw_reliability(rel: dict[str, Any]) -> bytes:
    """Accuracy per confidence bin against the diagonal, the gap shaded, image counts below."""
    plt = pyplot()
    edges = np.array(rel["edges"])
    width = np.diff(edges)
    count = np.array(rel["count"])
    full = count > 0  # empty bins have no accuracy to draw
    acc = np.array([a or 0.0 for a in rel["accuracy"]])[full]
    conf = np.array([c or 0.0 for c in rel["confidence"]])[full]
    left, bar_width = edges[:-1][full], width[full]
    fig, (ax, axc) = plt.subplots(2, 1, figsize=(5.5, 6), gridspec_kw={"height_ratios": [3, 1]}, sharex=True)
    ax.bar(left, acc, width=bar_width, align="edge", color="#3b82f6", edgecolor="white", label="accuracy")
    ax.bar(left, conf - acc, bottom=acc, width=bar_width, align="edge", color="#ef4444", alpha=0.35,
           edgecolor="#ef4444", label="gap to mean confidence")
    ax.plot([0, 1], [0, 1], "--", c="grey", lw=1, label="perfect calibration")
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.set_title(f"reliability diagram, ECE {100 * rel['ece']:.2f}% ({len(count)} bins)", fontsize=10)
    ax.legend(fontsize=8, loc="upper left")
    axc.bar(edges[:-1], count, width=width, align="edge", color="#9ca3af", edgecolor="white")
    axc.set_xlabel("confidence (top-1 probability)")
    axc.set_ylabel("images")
    axc.set_xlim(0, 1)
    fig.tight_layout()
    return figure_png(fig)


def confusion_png(confusion: list[list[int]], classes: list[str]) -> bytes | None:
    buf = io.BytesIO()
    return buf.getvalue() if save_confusion_png(confusion, classes, buf) else None


def display_images(images_u8: torch.Tensor, cfg) -> np.ndarray:
    """(B, C, h, w) dataset images -> (B, C, H, W) uint8 as the model sees them (channels, size),
    before normalisation."""
    x = to_model_input(to_float(images_u8), cfg.in_chans, cfg.img_size)
    return (x * 255).round().clamp(0, 255).to(torch.uint8).numpy()


def mistake_cards(model, data, out: dict[str, torch.Tensor], k: int, rt) -> tuple[list[dict[str, Any]], str]:
    """The `k` wrong predictions with the highest confidence: image, overlay (attention rollout),
    labels and confidence; and a line on the overlays when they could not be made."""
    wrong = torch.nonzero(out["pred"] != data.labels).flatten()
    order = wrong[out["conf"][wrong].argsort(descending=True, stable=True)][:k]
    if len(order) == 0:
        return [], ""
    shown = display_images(data.images[order], model.config)  # (m, C, H, W) uint8
    heat, why = None, ""
    try:
        from .attention import explain, overlay
        x, _ = EvalTransform(model.config)(data.images[order])
        heat, _ = explain(model, x.to(rt.device), method="rollout")
        heat = heat.detach().float().cpu().numpy()  # (m, gh, gw) in [0, 1]
    except (ImportError, VitlabError) as e:  # attention maps are a view, not the report
        why = f"attention overlays unavailable: {e}"
    cards = []
    for j, i in enumerate(order.tolist()):
        img = shown[j]
        rgb = img.repeat(3, 0) if img.shape[0] == 1 else img
        card = {"index": i, "true": data.classes[int(data.labels[i])], "pred": data.classes[int(out["pred"][i])],
                "conf": float(out["conf"][i]), "image": pixels_png(rgb.transpose(1, 2, 0))}  # (3, H, W) -> (H, W, 3)
        if heat is not None:
            card["overlay"] = pixels_png(overlay(rgb, heat[j]))
        cards.append(card)
    return cards, why


# ---- curves ------------------------------------------------------------------------------------
def draw_curves(records: list[dict[str, Any]]) -> dict[str, bytes]:
    """{"loss" | "accuracy" | "lr": PNG} from metrics.jsonl records (what engine.log.plot_curves
    draws, in memory); a curve without points is left out."""
    plt = pyplot()
    steps = [r for r in records if r.get("kind") == "step"]
    epochs = [r for r in records if r.get("kind") == "epoch"]
    specs = {
        "loss": ("loss", [(steps, "loss", "train (logged steps)"), (epochs, "train_loss", "train (epoch mean)"),
                          (epochs, "val_loss", "val"), (epochs, "val_ema_loss", "val (EMA)")]),
        "accuracy": ("accuracy", [*train_accuracy_series(steps), (epochs, "train_acc", "train (epoch mean)"),
                                  (epochs, "val_top1", "val top-1"), (epochs, "val_ema_top1", "val top-1 (EMA)")]),
        "lr": ("learning rate", [(steps, "lr", "lr")]),
    }
    pngs = {}
    for key, (ylabel, series) in specs.items():
        fig = curve_figure(plt, ylabel, series, figsize=(6, 3.8), title=True, legend_size=8)
        if fig is not None:
            pngs[key] = figure_png(fig)
    return pngs


# ---- the page ----------------------------------------------------------------------------------
def _section(sid: str, body: str) -> str:
    return f'<section id="{sid}"><h2>{esc(SECTIONS[sid])}</h2>\n{body}\n</section>'


def _config_body(run: Path, model_dir: Path | None) -> str:
    parts = []
    cfg = run / "config.yaml"
    if cfg.is_file():
        parts.append(f"<h3>Run settings ({esc(cfg.name)})</h3><pre>{esc(cfg.read_text(errors='replace'))}</pre>")
    else:
        parts.append(note("config.yaml is missing: no run settings to show"))
    if model_dir is not None:
        doc, why = _read_json(model_dir / "config.json")
        mcfg = doc.get("config") if isinstance(doc, dict) else None
        if isinstance(mcfg, dict):
            parts.append("<h3>Model config</h3>" + table(["field", "value"], [[esc(k), value_html(v)]
                                                                            for k, v in mcfg.items()]))
            extra = doc.get("extra")
            if isinstance(extra, dict) and extra:
                parts.append("<h3>Model record</h3>" + table(["field", "value"], [[esc(k), value_html(v)]
                                                                                for k, v in extra.items()]))
        else:
            parts.append(note(why or "the model's config.json holds no config"))
    results, _ = _read_json(run / "results.json")
    if isinstance(results, dict):
        parts.append("<h3>Results (results.json)</h3>" + table(["field", "value"], [[esc(k), value_html(v)]
                                                                                   for k, v in results.items()]))
    return "\n".join(parts)


def _machine_body(run: Path) -> str:
    env, why = _read_json(run / "env.json")
    if not isinstance(env, dict):
        return note(why or "env.json is not a mapping")
    rows = [[esc(k), value_html(" ".join(map(str, v)) if k == "argv" and isinstance(v, list) else v)]
            for k, v in env.items()]
    return table(["", "value"], rows)


def _curves_body(run: Path) -> str:
    path = run / "metrics.jsonl"
    if not path.is_file():
        return note("metrics.jsonl is missing: no curves to draw")
    records = read_metrics(path)
    if not records:
        return note("metrics.jsonl holds no records yet")
    try:
        pngs = draw_curves(records)
    except VitlabError as e:
        return note(str(e))
    if not pngs:
        return note("metrics.jsonl holds no loss, accuracy or learning-rate values")
    epochs = [r for r in records if r.get("kind") == "epoch"]
    last = epochs[-1] if epochs else {}
    summary = ", ".join(f"{k} {last[k]:.4g}" for k in ("train_loss", "val_loss", "val_top1", "val_ece")
                        if isinstance(last.get(k), (int, float)))
    figs = "".join(f"<figure>{img_tag(d, f'{k} curve')}<figcaption>{esc(k)}</figcaption></figure>"
                   for k, d in pngs.items())
    return (f"<p>{len(records)} records, {len(epochs)} epoch(s)" + (f"; last epoch: {esc(summary)}" if summary else "")
            + f'</p><div class="figs">{figs}</div>')


def _eval_bodies(m: dict[str, Any], classes: list[str], cards: list[dict[str, Any]], cards_note: str,
                 what: str, k_mistakes: int) -> dict[str, str]:
    K = len(classes)
    rows = [[esc(c), f"{n}", f"{100 * a:.2f}", f'<span class="bar" style="width:{round(60 * a)}px"></span>']
            for c, n, a in zip(classes, m["per_class_n"], m["per_class"])]
    head = (f"<p>{esc(what)}: {m['n']} images, top-1 <b>{100 * m['top1']:.2f}%</b>, loss {m['loss']:.4f}, "
            f"ECE {100 * m['reliability']['ece']:.2f}%.</p>")
    per_class = head + table(["class", "images", "accuracy %", ""], rows, numeric={1, 2}, tall=K > 20)

    conf_parts = []
    try:
        png = confusion_png(m["confusion"], classes)
    except VitlabError:
        png = None
    conf_parts.append(img_tag(png, "confusion matrix, rows true class, columns predicted", "medium") if png
                      else note("matplotlib is not installed: the table alone"))
    if K <= 20 or png is None:
        conf_rows = [[esc(c)] + [str(v) for v in row] for c, row in zip(classes, m["confusion"])]
        conf_parts.append("<h3>Counts (rows: true class, columns: predicted)</h3>" +
                          table(["true \\ predicted", *classes], conf_rows, numeric=set(range(1, K + 1))))
    confusion = "\n".join(conf_parts)

    rel = m["reliability"]
    try:
        rel_img = img_tag(draw_reliability(rel), f"reliability diagram, ECE {100 * rel['ece']:.2f}%")
    except VitlabError as e:
        rel_img = note(str(e))

    def fmt(v: float | None) -> str:
        return "" if v is None else f"{v:.3f}"
    bin_rows = [[f"{lo:.2f}-{hi:.2f}", str(c), fmt(cf), fmt(a)]
                for lo, hi, c, cf, a in zip(rel["edges"], rel["edges"][1:], rel["count"], rel["confidence"],
                                            rel["accuracy"])]
    calibration = (f"<p>Expected calibration error: <b>{100 * rel['ece']:.2f}%</b> (the count-weighted gap "
                   f"between confidence and accuracy over {len(rel['count'])} equal-width bins).</p>"
                   f'<div class="row"><figure class="medium">{rel_img}</figure>'
                   + table(["confidence bin", "images", "mean confidence", "accuracy"], bin_rows, numeric={1, 2, 3})
                   + "</div>")

    if not cards:
        mistakes = note(f"no mistakes among the {m['n']} images")
    else:
        items = []
        for c in cards:
            pics = img_tag(c["image"], "image", "pix")
            pics += img_tag(c["overlay"], "attention rollout overlay", "pix") if "overlay" in c else ""
            items.append(f'<div class="card"><div class="pair">{pics}</div><div>true <b>{esc(c["true"])}</b>, '
                         f'predicted <b>{esc(c["pred"])}</b> ({100 * c["conf"]:.1f}%)</div>'
                         f'<div class="note">image #{c["index"]}</div></div>')
        mistakes = (f"<p>The {len(cards)} wrong predictions made with the highest confidence (of {k_mistakes} asked), "
                    f"each beside its attention rollout (Abnar &amp; Zuidema, arXiv 2005.00928): bright is where "
                    f"the attention flowing to the classifier comes from.</p>"
                    + (note(cards_note) if cards_note else "") + f'<div class="cards">{"".join(items)}</div>')
    return {"per-class": per_class, "confusion": confusion, "calibration": calibration, "mistakes": mistakes}


def _inspect_body(model, images: torch.Tensor, images_note: str) -> str:
    try:
        pngs, summary = render_inspect(model, images)
    except VitlabError as e:
        return note(f"not drawn: {e}")
    dist = np.array(summary["attention_distance"]["per_layer_per_head"])
    captions = {"filters": summary["patch_embed"]["note"] + f" ({summary['patch_embed']['source']})",
                "pos_embed": f"cosine similarity of position embeddings ({summary['pos_embed']['kind']}, "
                             f"{summary['pos_embed']['grid']}x{summary['pos_embed']['grid']} grid)",
                "attention_distance": f"mean attention distance per head over {summary['images']} images; "
                                      f"uniform attention: {summary['attention_distance']['uniform_attention']:.1f} px"}
    figs = "".join(f"<figure>{img_tag(d, captions[k])}<figcaption>{esc(captions[k])}</figcaption></figure>"
                   for k, d in pngs.items())
    line = (f"Mean attention distance, first layer {dist[0].mean():.1f} px, last layer {dist[-1].mean():.1f} px "
            f"(head means). Images: {images_note}.") if dist.size else f"Images: {images_note}."
    return f"<p>{esc(line)}</p><div class=\"figs\">{figs}</div>"


def write_report(run_dir: str | os.PathLike, out_path: str | os.PathLike | None = None, *, split: str = "test",
                 data_dir: str | os.PathLike | None = None, limit: int | None = None, mistakes: int = 12,
                 device: str = "auto", precision: str = "auto", batch_size: int = 256) -> Path:
    """Write the run's report (default RUN/report.html) and return its path.

    The model (RUN/model) is evaluated on `split` of the dataset its config.json records
    (`data_dir` overrides where it is looked for; `limit` evaluates a stratified, seeded subset of
    that many images) on `device` in `precision` ('auto' picks as `vitlab eval` does). Raises
    RunDirError when `run_dir` is not a run or model directory, and ConfigError for bad
    arguments; a missing model or dataset only empties the sections that need it."""
    run = Path(run_dir)
    if not run.is_dir():
        raise RunDirError(f"{run} is not a directory; give a run directory (vitlab train --out)")
    model_dir = _model_dir(run)
    if model_dir is None and not any((run / n).is_file() for n in ("config.yaml", "metrics.jsonl", "env.json")):
        raise RunDirError(f"{run} is not a vitlab run directory: it has no config.yaml, metrics.jsonl, env.json "
                          f"or model/")
    if split not in ("train", "val", "test"):
        raise ConfigError(f"split {split!r} must be one of ('train', 'val', 'test')")
    if limit is not None and limit < 1:
        raise ConfigError(f"limit {limit} must be >= 1 (or None to evaluate every image)")
    if mistakes < 0:
        raise ConfigError(f"mistakes {mistakes} must be >= 0")
    out = Path(out_path) if out_path is not None else run / "report.html"
    if out.is_dir():
        raise ConfigError(f"--out {out} is a directory; give a file name such as {out / 'report.html'}")
    if (out.exists() or out.is_symlink()) and not _is_report(out):
        raise ConfigError(f"--out {out} exists and is not a vitlab report; vitlab never replaces other files")

    bodies = {"config": _config_body(run, model_dir), "machine": _machine_body(run), "curves": _curves_body(run)}
    model, data, why_no_eval = None, None, ""
    if model_dir is None:
        why_no_eval = f"{run / 'model'} does not exist yet: a run exports its model when training ends"
    else:
        try:
            model = load_model(model_dir)
        except (VitlabError, OSError) as e:
            why_no_eval = f"the model cannot be loaded: {e}"
    if model is not None:
        try:
            data = recorded_dataset(model_dir, model, split, data_dir)
            if limit is not None and limit < len(data):
                keep = subset(len(data), data.labels, limit)
                data = data.take(keep)
            if len(data) == 0:
                raise VitlabError(f"the {split} split holds no images")
        except (VitlabError, OSError) as e:
            data, why_no_eval = None, f"the {split} split of the run's dataset is not available: {e}"
    if data is not None:
        rt = setup_runtime(device, precision)
        model.to(rt.device)
        preds = predict_split(model, data, rt, batch_size)
        metrics = split_metrics(preds, data.labels, len(data.classes))
        cards, cards_note = mistake_cards(model, data, preds, mistakes, rt)
        what = f"{data.name}, {split} split" + (f" (stratified subset of {limit})" if limit is not None else "")
        bodies.update(_eval_bodies(metrics, data.classes, cards, cards_note, what, mistakes))
    else:
        for sid in EVAL_SECTIONS:
            bodies[sid] = note(f"Not evaluated: {why_no_eval}.")
    if model is None:
        bodies["inspect"] = note(f"Not drawn: {why_no_eval}.")
    else:
        if data is not None:
            keep = subset(len(data), data.labels, NUM_IMAGES)
            images, _ = EvalTransform(model.config)(data.images[keep])
            images_note = f"{len(keep)} images of the {data.name} {split} split"
        else:
            images, _ = inspect_images(model, n=NUM_IMAGES)
            images_note = f"{len(images)} images of Gaussian noise, since {why_no_eval}"
        bodies["inspect"] = _inspect_body(model, images, images_note)

    page = render_page(run, bodies)
    out.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_text(out, page)


GENERATOR = '<meta name="generator" content="vitlab report">'


def _is_report(path: Path) -> bool:
    """Whether `path` is a regular file that an earlier `vitlab report` wrote (it may be replaced)."""
    try:
        if path.is_symlink() or not path.is_file():
            return False
        with open(path, "rb") as f:
            return GENERATOR.encode() in f.read(4096)
    except OSError:
        return False


def render_page(run: Path, bodies: dict[str, str]) -> str:
    """The whole document around the section bodies (already HTML)."""
    from . import __version__
    title = f"vitlab report: {run.resolve().name}"
    results, _ = _read_json(run / "results.json")
    facts = []
    if isinstance(results, dict):
        test = results.get("test") if isinstance(results.get("test"), dict) else {}
        best = results.get("best") if isinstance(results.get("best"), dict) else {}
        for label, v in (("test top-1", test.get("top1")), ("val top-1 (selected)", best.get("val_top1"))):
            if isinstance(v, (int, float)):
                facts.append(f"<span>{esc(label)} <b>{100 * v:.2f}%</b></span>")
        for label, key in (("steps", "steps"), ("training time (s)", "train_s"), ("parameters", "params")):
            v = results.get(key)
            if isinstance(v, (int, float)):
                facts.append(f"<span>{esc(label)} <b>{v:,}</b></span>")
    nav = "".join(f'<a href="#{sid}">{esc(name)}</a>' for sid, name in SECTIONS.items())
    made = datetime.datetime.now().isoformat(timespec="seconds")
    sections = "\n".join(_section(sid, bodies[sid]) for sid in SECTIONS)
    return f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
{GENERATOR}
<title>{esc(title)}</title>
<style>{CSS}</style>
</head>
<body>
<main>
<header>
<h1>{esc(title)}</h1>
<p class="note">{esc(str(run.resolve()))}</p>
<div class="kv">{''.join(facts)}</div>
<nav>{nav}</nav>
</header>
{sections}
<footer class="note">Written by vitlab {esc(__version__)} on {esc(made)}.</footer>
</main>
</body>
</html>
"""


__all__ = ["SECTIONS", "write_report", "predict_split", "split_metrics", "draw_curves", "draw_reliability"]
