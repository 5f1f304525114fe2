"""What a run shows and keeps: a progress bar, one summary line per epoch, `metrics.jsonl`,
TensorBoard logs when tensorboard is installed, and PNG curves at the end. Only rank 0 writes."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any


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
        """A resumed run repeats the steps after its checkpoint: forget what was logged for them."""
        if path.is_file():
            keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line).get("step", 0) <= step]
            path.write_text("".join(line + "\n" for line in keep))

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

    def start_epoch(self, epoch: int, epochs: int, total: int, initial: int) -> None:
        if self.progress:
            from tqdm import tqdm
            self.bar = tqdm(total=total, initial=initial, desc=f"epoch {epoch + 1}/{epochs}", unit="step",
                            dynamic_ncols=True, leave=False, file=sys.stderr)

    def update(self, **postfix: Any) -> None:
        if self.bar is not None:
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
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [r for r in records if r.get("kind") == "step"]
    epochs = [r for r in records if r.get("kind") == "epoch"]
    out = []
    specs = [
        ("loss.png", "loss", [(steps, "step", "loss", "train (step)"), (epochs, "step", "val_loss", "val")]),
        ("accuracy.png", "accuracy", [(steps, "step", "acc", "train batch (step)"),
                                      (epochs, "step", "val_top1", "val top-1"),
                                      (epochs, "step", "val_ema_top1", "val top-1 (EMA)")]),
        ("lr.png", "learning rate", [(steps, "step", "lr", "lr")]),
    ]
    for name, ylabel, series in specs:
        fig, ax = plt.subplots(figsize=(6, 4))
        drawn = False
        for rows, xk, yk, label in series:
            pts = [(r[xk], r[yk]) for r in rows if yk in r]
            if pts:
                ax.plot(*zip(*pts), label=label, marker="o" if rows is epochs else None, markersize=3)
                drawn = True
        if drawn:
            ax.set_xlabel("optimizer step")
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
            ax.legend()
            fig.tight_layout()
            fig.savefig(run_dir / name, dpi=110)
            out.append(run_dir / name)
        plt.close(fig)
    return out
