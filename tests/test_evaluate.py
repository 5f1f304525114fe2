"""evaluate() against numbers worked out by hand."""
import math

import pytest
import torch

from vitlab.engine.runtime import Runtime
from vitlab.evaluate import evaluate

CPU = Runtime(torch.device("cpu"), "fp32")


class Fixed(torch.nn.Module):
    """Returns the logits stored for each input index (inputs are indices)."""

    def __init__(self, logits):
        super().__init__()
        self.register_buffer("table", torch.tensor(logits, dtype=torch.float32))

    def forward(self, x):
        return self.table[x.long().flatten()]


def test_metrics_match_a_hand_computation():
    # 4 samples, 3 classes. probabilities via softmax of these logits:
    logits = [[4.0, 0.0, 0.0],   # true 0, predicted 0 (confident)
              [0.0, 1.0, 0.0],   # true 1, predicted 1
              [3.0, 0.0, 2.0],   # true 2, predicted 0; class 2 is second
              [0.0, 0.0, 5.0]]   # true 1, predicted 2; class 1 is tied last
    y = torch.tensor([0, 1, 2, 1])
    batches = [(torch.tensor([0, 1]), y[:2]), (torch.tensor([2, 3]), y[2:])]
    m = evaluate(Fixed(logits), batches, 3, CPU)
    probs = torch.tensor(logits).softmax(-1)
    assert m["n"] == 4
    assert m["top1"] == pytest.approx(0.5)
    assert m["top3"] == pytest.approx(1.0)  # top-5 is capped at the class count
    assert m["loss"] == pytest.approx(-probs[torch.arange(4), y].log().mean().item(), rel=1e-6)
    assert m["confusion"] == [[1, 0, 0], [0, 1, 1], [1, 0, 0]]
    assert m["per_class"] == pytest.approx([1.0, 0.5, 0.0])
    conf = probs.max(-1).values
    correct = torch.tensor([1.0, 1.0, 0.0, 0.0])
    bins = (conf * 15).long()
    ece = sum(abs(conf[bins == b].sum() - correct[bins == b].sum()).item() for b in bins.unique()) / 4
    assert m["ece"] == pytest.approx(ece, rel=1e-6)


def test_top5_and_tta():
    torch.manual_seed(0)
    logits = torch.randn(50, 10)
    y = torch.randint(0, 10, (50,))
    m = evaluate(Fixed(logits.tolist()), [(torch.arange(50), y)], 10, CPU)
    expected = (logits.topk(5, -1).indices == y[:, None]).any(-1).float().mean().item()
    assert m["top5"] == pytest.approx(expected)

    class Mirror(torch.nn.Module):  # the mirror image gives the opposite logits
        def forward(self, x):
            return x.sum((1, 2, 3))[:, None] * torch.tensor([[1.0, -1.0]])
    x = torch.zeros(2, 1, 1, 2)
    x[0, 0, 0, 0] = 1.0  # flipping moves the pixel but keeps the sum: TTA changes nothing
    m = evaluate(Mirror(), [(x, torch.tensor([0, 1]))], 2, CPU, tta=True)
    assert m["top1"] == pytest.approx(0.5) and m["loss"] == pytest.approx(
        -0.5 * (math.log(torch.tensor([1.0, -1.0]).softmax(0)[0].item()) + math.log(0.5)), rel=1e-5)
