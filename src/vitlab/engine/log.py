"""What a run shows and keeps: a progress bar, one summary line per epoch, `metrics.jsonl`,
TensorBoard logs when tensorboard is installed, and PNG curves at the end. Only rank 0 writes."""
from __future__ import annotations

import json
import math
import sys
import time
import warnings
from pathlib import Path
from typing import Any

from ..util import atomic_write_text


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl file. A line that is not a JSON object (a write torn by a
    full disk or a kill) is skipped with one warning naming the file and the line numbers."""
    records, torn = [], []
    for n, line in enumerate(path.read_text(errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if isinstance(record, dict):
            records.append(record)
        else:
            torn.append(n)
    if torn:
        warnings.warn(f"{path}: skipped {len(torn)} unreadable line(s) (line {', '.join(map(str, torn[:5]))}; "
                      f"a write torn by a full disk or a kill)", stacklevel=2)
    return records


def mmss(seconds: float) -> str:
    """125.4 -> "02:05"; minutes go past 59 rather than adding hours (a budget is given in minutes)."""
    m, sec = divmod(max(0, int(math.ceil(seconds))), 60)
    return f"{m:02d}:{sec:02d}"


class RunLogger:
    def __init__(self, run_dir: Path, enabled: bool, progress: bool, resume_step: int | None = None):
        self.run_dir, self.enabled, self.progress = run_dir, enabled, progress and enabled
        self.bar = None
        self.tb = None
        if enabled:
            run_dir.mkdir(parents=True, exist_ok=True)
            if resume_step is not None:
                self._drop_after(run_dir / "metrics.jsonl", resume_step)
            self.metrics_file = open(run_dir / "metrics.jsonl", "a", buffering=1)
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(str(run_dir / "tensorboard"))
            except ImportError:  # optional: pip install tensorboard
                self.tb = None

    @staticmethod
    def _drop_after(path: Path, step: int) -> None:
        """A resumed run repeats the steps after its checkpoint: forget what was logged for them
        (and any torn line, which the next append would otherwise glue a record to)."""
        if path.is_file():
            keep = [r for r in read_metrics(path) if isinstance(r.get("step", 0), int) and r.get("step", 0) <= step]
            atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in keep))

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"time": round(time.time(), 3), **record}
        self.metrics_file.write(json.dumps(record) + "\n")
        if self.tb is not None:
            step = record.get("step", 0)
            for k, v in record.items():
                if isinstance(v, (int, float)) and k not in ("step", "epoch", "time"):
                    self.tb.add_scalar(f"{record.get('kind', 'x')}/{k}", v, step)

    def start_epoch(self, epoch: int, epochs: int | None, total: int, initial: int,
                    left_s: float | None = None) -> None:
        """A bar over the epoch's steps; under a time budget (`epochs` None) it names the budget left."""
        if self.progress:
            from tqdm import tqdm
            self.epoch_name = f"epoch {epoch + 1}" + (f"/{epochs}" if epochs is not None else "")
            self.bar = tqdm(total=total, initial=initial, desc=self._desc(left_s), unit="step",
                            dynamic_ncols=True, leave=False, file=sys.stderr)

    def _desc(self, left_s: float | None) -> str:
        return self.epoch_name + (f", {mmss(left_s)} left" if left_s is not None else "")

    def update(self, left_s: float | None = None, **postfix: Any) -> None:
        if self.bar is not None:
            if left_s is not None:
                self.bar.set_description_str(self._desc(left_s), refresh=False)
            self.bar.set_postfix(postfix, refresh=False)
            self.bar.update(1)

    def end_epoch(self, line: str) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.enabled:
            print(line, flush=True)

    def info(self, line: str) -> None:
        if self.enabled:
            print(line, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.enabled:
            self.metrics_file.close()
            if self.tb is not None:
                self.tb.close()


def plot_curves(run_dir: Path) -> list[Path]:
    """loss.png, accuracy.png and lr.png from metrics.jsonl; [] when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    records = read_metrics(run_dir / "metrics.jsonl")
    steps = [r for r in records if r.get("kind") == "step"]
    epochs = [r for r in records if r.get("kind") == "epoch"]
    out = []
    specs = [
        ("loss.png", "loss", [(steps, "loss", "train (step)"), (epochs, "val_loss", "val")]),
        ("accuracy.png", "accuracy", [*train_accuracy_series(steps), (epochs, "val_top1", "val top-1"),
                                      (epochs, "val_ema_top1", "val top-1 (EMA)")]),
        ("lr.png", "learning rate", [(steps, "lr", "lr")]),
    ]
    for name, ylabel, series in specs:
        fig = curve_figure(plt, ylabel, series)
        if fig is not None:
            fig.savefig(run_dir / name, dpi=110)
            out.append(run_dir / name)
            plt.close(fig)
    return out


def train_accuracy_series(steps: list[dict[str, Any]]) -> list[tuple[list[dict[str, Any]], str, str]]:
    """The step records' training-accuracy curves (records, key, label): each step's own batch
    ("batch_acc"). Records written before that key existed hold only "acc", the mean over the epoch
    so far, which restarts at each epoch; they are drawn as a second curve under that name, so that
    its jumps read as what they are (a run resumed across the change has both)."""
    new = [r for r in steps if "batch_acc" in r]
    old = [r for r in steps if "batch_acc" not in r]
    return ([(new, "batch_acc", "train batch (step)")] if new else []) + \
        ([(old, "acc", "train, mean over the epoch so far")] if old else [])


def curve_figure(plt, ylabel: str, series: list[tuple[list[dict[str, Any]], str, str]],
                 figsize: tuple[float, float] = (6, 4), title: bool = False, legend_size: float | None = None):
    """One matplotlib figure of metrics records against the optimizer step: each series is
    (records, key, label), epoch records drawn with markers; records whose key or step is not a
    number are skipped. None (and no figure left open) when no series has a point."""
    def number(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool)
    fig, ax = plt.subplots(figsize=figsize)
    drawn = False
    for rows, yk, label in series:
        pts = [(r["step"], r[yk]) for r in rows if number(r.get(yk)) and number(r.get("step"))]
        if pts:
            ax.plot(*zip(*pts), label=label, marker="o" if rows[0].get("kind") == "epoch" else None, markersize=3)
            drawn = True
    if not drawn:
        plt.close(fig)
        return None
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=legend_size)
    if title:
        ax.set_title(ylabel, fontsize=10)
    fig.tight_layout()
    return fig
