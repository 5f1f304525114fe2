"""Evaluation metrics: loss, top-1 / top-5, per-class accuracy, confusion matrix, expected
calibration error (Guo et al., arXiv 1706.04599, 15 equal-width bins), optional test-time
augmentation (TTA_MODES). Sums are reduced across ranks, so every rank returns the same numbers.

The result always has the same keys: n, loss, top1, top5, top5_k, ece (+ per_class, confusion with
`details`). `top5` counts a hit among the `top5_k = min(5, num_classes)` most probable classes.
`reliability_bins` gives the per-bin numbers behind the ECE (a reliability diagram)."""
from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F

from .engine.runtime import Runtime, all_reduce_sum
from .errors import ConfigError, DataError

ECE_BINS = 15
TTA_MODES = {
    "flip": "the image and its horizontal mirror (for classes that mirroring keeps: photos, not digits)",
    "shift": "the image and its four 1-pixel shifts, edge pixels repeated (keeps any class, digits too)",
    "flip-shift": "the five views of shift and their mirrors: ten views (photos)",
}


def check_tta_mode(tta: bool | str | None) -> str | None:
    """The TTA mode that `tta` names (True: "flip"; False or None: no TTA), or ConfigError."""
    mode = "flip" if tta is True else (tta or None)
    if mode is not None and mode not in TTA_MODES:
        raise ConfigError(f"test-time augmentation {mode!r} is not one of {sorted(TTA_MODES)}")
    return mode


def tta_views(x: torch.Tensor, mode: str) -> list[torch.Tensor]:
    """The views of a (B, C, H, W) batch that `mode` (a key of TTA_MODES) averages over, the image first."""
    if check_tta_mode(mode) == "flip":
        return [x, x.flip(-1)]
    if mode == "shift":
        H, W = x.shape[-2:]
        padded = F.pad(x, (1, 1, 1, 1), mode="replicate")
        # crop (top, left) of the padded image: (1, 1) is the image; (0, 1) moves its content 1 px down
        return [x] + [padded[..., t:t + H, l:l + W] for t, l in ((0, 1), (2, 1), (1, 0), (1, 2))]
    if mode == "flip-shift":
        shifted = tta_views(x, "shift")
        return shifted + [v.flip(-1) for v in shifted]
    raise ConfigError(f"no views for test-time augmentation {mode!r}")  # a TTA_MODES key without views


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: Iterable, num_classes: int, rt: Runtime,
             tta: bool | str | None = False, details: bool = True) -> dict:
    """Metrics of `model` over (inputs, labels) batches (keys in the module docstring). With `tta`
    (a TTA_MODES key; True means "flip"), the probabilities of the mode's views of each image are
    averaged. Raises ConfigError for an unknown mode, DataError when the batches hold no image."""
    mode = check_tta_mode(tta)  # before any work
    was_training = model.training
    model.eval()
    K = num_classes
    loss_sum = torch.zeros((), dtype=torch.float64)
    top5_hits = torch.zeros((), dtype=torch.float64)
    confusion = torch.zeros(K, K, dtype=torch.float64)  # rows: true class, columns: predicted
    bin_count = torch.zeros(ECE_BINS, dtype=torch.float64)
    bin_conf = torch.zeros(ECE_BINS, dtype=torch.float64)
    bin_acc = torch.zeros(ECE_BINS, dtype=torch.float64)
    k5 = min(5, K)
    for x, y in batches:
        x, y = x.to(rt.device, non_blocking=True), y.to(rt.device, non_blocking=True)
        with rt.autocast():
            if mode is None:
                probs = model(x).float().softmax(-1)
            else:
                views = tta_views(x, mode)
                probs = sum(model(v).float().softmax(-1) for v in views) / len(views)
        log_probs = probs.clamp_min(1e-12).log()
        loss_sum += F.nll_loss(log_probs, y, reduction="sum").double().cpu()
        conf, pred = probs.max(-1)
        top5_hits += (probs.topk(k5, dim=-1).indices == y[:, None]).any(-1).sum().double().cpu()
        confusion += torch.bincount((y * K + pred).cpu(), minlength=K * K).reshape(K, K).double()
        correct = (pred == y).double().cpu()
        b = (conf.double().cpu() * ECE_BINS).long().clamp_(max=ECE_BINS - 1)
        bin_count += torch.bincount(b, minlength=ECE_BINS).double()
        bin_conf += torch.bincount(b, weights=conf.double().cpu(), minlength=ECE_BINS)
        bin_acc += torch.bincount(b, weights=correct, minlength=ECE_BINS)
    packed = all_reduce_sum(torch.cat([loss_sum[None], top5_hits[None], confusion.flatten(), bin_count,
                                       bin_conf, bin_acc]).to(rt.device), rt).cpu()
    loss_sum, top5_hits = packed[0], packed[1]
    confusion = packed[2:2 + K * K].reshape(K, K)
    bin_count, bin_conf, bin_acc = packed[2 + K * K:].reshape(3, ECE_BINS)
    n = confusion.sum().item()
    model.train(was_training)
    if n == 0:
        raise DataError("nothing to evaluate: the batches hold no images")
    per_class_n = confusion.sum(1)
    metrics = {
        "n": int(n),
        "loss": loss_sum.item() / n,
        "top1": confusion.diag().sum().item() / n,
        "top5": top5_hits.item() / n,
        "top5_k": k5,
        "ece": ((bin_conf - bin_acc).abs().sum() / n).item(),
    }
    if details:
        metrics["per_class"] = (confusion.diag() / per_class_n.clamp_min(1)).tolist()
        metrics["confusion"] = confusion.long().tolist()
    return metrics


def reliability_bins(conf: torch.Tensor, correct: torch.Tensor, bins: int = ECE_BINS) -> dict:
    """A reliability diagram's numbers from each image's top-1 confidence and whether it was right,
    in the equal-width bins of `evaluate`'s ECE: {"edges" (bins + 1), "count", "confidence" and
    "accuracy" per bin (None where a bin is empty), "ece"}. Raises DataError for no images."""
    conf, correct = conf.detach().double().flatten().cpu(), correct.detach().double().flatten().cpu()
    if conf.numel() == 0 or conf.shape != correct.shape:
        raise DataError(f"reliability bins need one correctness per confidence and at least one image, got "
                        f"{conf.numel()} confidences and {correct.numel()} correctness values")
    b = (conf * bins).long().clamp_(0, bins - 1)
    count = torch.bincount(b, minlength=bins).double()
    sum_conf = torch.bincount(b, weights=conf, minlength=bins)
    sum_acc = torch.bincount(b, weights=correct, minlength=bins)

    def per_bin(sums: torch.Tensor) -> list[float | None]:
        return [s / c if c else None for s, c in zip(sums.tolist(), count.tolist())]
    return {"edges": [i / bins for i in range(bins + 1)], "count": count.long().tolist(),
            "confidence": per_bin(sum_conf), "accuracy": per_bin(sum_acc),
            "ece": ((sum_conf - sum_acc).abs().sum() / count.sum()).item()}


def save_confusion_png(confusion: list[list[int]], classes: list[str], path) -> bool:
    """A confusion-matrix heat map; False when matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    K = len(confusion)
    fig, ax = plt.subplots(figsize=(min(4 + 0.45 * K, 20), min(3.5 + 0.45 * K, 20)))
    m = torch.tensor(confusion, dtype=torch.float64)
    im = ax.imshow((m / m.sum(1, keepdim=True).clamp_min(1)).numpy(), cmap="Blues", vmin=0, vmax=1)
    if K <= 30:
        labels = [str(c).replace("$", r"\$") for c in classes]  # class names are data, not TeX ("$" starts math)
        ax.set_xticks(range(K), labels, rotation=90, fontsize=7)
        ax.set_yticks(range(K), labels, fontsize=7)
        if K <= 12:
            for i in range(K):
                for j in range(K):
                    ax.text(j, i, int(m[i, j]), ha="center", va="center", fontsize=7,
                            color="white" if m[i, j] > m[i].sum() / 2 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
