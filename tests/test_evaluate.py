"""evaluate() against numbers worked out by hand or computed here independently."""
import pytest
import torch

from vitlab.engine.runtime import Runtime
from vitlab.errors import ConfigError, DataError
from vitlab.evaluate import evaluate, reliability_bins

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
    assert m["top5"] == pytest.approx(1.0) and m["top5_k"] == 3  # top-5 is capped at the class count
    assert m["loss"] == pytest.approx(-probs[torch.arange(4), y].log().mean().item(), rel=1e-6)
    assert m["confusion"] == [[1, 0, 0], [0, 1, 1], [1, 0, 0]]
    assert m["per_class"] == pytest.approx([1.0, 0.5, 0.0])
    conf = probs.max(-1).values
    correct = torch.tensor([1.0, 1.0, 0.0, 0.0])
    bins = (conf * 15).long()
    ece = sum(abs(conf[bins == b].sum() - correct[bins == b].sum()).item() for b in bins.unique()) / 4
    assert m["ece"] == pytest.approx(ece, rel=1e-6)


def expected_metrics(probs: torch.Tensor, y: torch.Tensor) -> dict:
    """The summary metrics of class probabilities `probs` (N x K), computed sample by sample."""
    n, k = probs.shape
    k5 = min(5, k)
    top5 = sum(int(y[i]) in probs[i].topk(k5).indices.tolist() for i in range(n)) / n
    conf, pred = probs.max(-1)
    correct = (pred == y).double()
    bins = [min(int(c * 15), 14) for c in conf.tolist()]
    ece = sum(abs(sum(conf[i].item() - correct[i].item() for i in range(n) if bins[i] == b)) for b in set(bins)) / n
    return {"n": n, "loss": -sum(probs[i, y[i]].log().item() for i in range(n)) / n,
            "top1": correct.mean().item(), "top5": top5, "top5_k": k5, "ece": ece}


def assert_summary(m: dict, want: dict) -> None:
    assert set(m) == {"n", "loss", "top1", "top5", "top5_k", "ece", "per_class", "confusion"}
    for key, value in want.items():
        assert m[key] == pytest.approx(value, rel=1e-5, abs=1e-7), key


def test_top5_counts_a_hit_among_the_five_most_probable():
    torch.manual_seed(0)
    logits = torch.randn(50, 10)
    y = torch.randint(0, 10, (50,))
    m = evaluate(Fixed(logits.tolist()), [(torch.arange(50), y)], 10, CPU)
    assert_summary(m, expected_metrics(logits.softmax(-1), y))
    assert 0 < m["top1"] < m["top5"] < 1  # the data tell top-1 and top-5 apart


class Linear(torch.nn.Module):
    """A fixed random linear map of the pixels: its output changes when the image is mirrored."""

    def __init__(self, shape, classes):
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.register_buffer("w", torch.randn(classes, *shape, generator=g))

    def forward(self, x):
        return torch.einsum("bchw,kchw->bk", x, self.w)


def test_flip_tta_averages_the_probabilities_of_the_image_and_its_mirror():
    g = torch.Generator().manual_seed(2)
    x = torch.rand(64, 2, 3, 5, generator=g)
    y = torch.randint(0, 7, (64,), generator=g)
    model = Linear((2, 3, 5), 7)
    with torch.no_grad():
        plain = model(x).softmax(-1)
        mirrored = model(x.flip(-1)).softmax(-1)  # horizontal mirror: the last (width) axis
    batches = [(x[:40], y[:40]), (x[40:], y[40:])]
    tta = evaluate(model, batches, 7, CPU, tta=True)
    assert_summary(tta, expected_metrics((plain + mirrored) / 2, y))
    off = evaluate(model, batches, 7, CPU)
    assert_summary(off, expected_metrics(plain, y))
    assert abs(tta["loss"] - off["loss"]) > 0.1  # the mirror matters to this model


def test_shift_tta_averages_the_image_and_its_four_one_pixel_shifts():
    g = torch.Generator().manual_seed(3)
    x = torch.rand(30, 1, 4, 6, generator=g)  # H != W: a swapped axis would show
    y = torch.randint(0, 5, (30,), generator=g)
    model = Linear((1, 4, 6), 5)

    def moved(dy, dx):  # content moved dy px down, dx px right; the edge row / column repeated
        rows = (torch.arange(4) - dy).clamp(0, 3)
        cols = (torch.arange(6) - dx).clamp(0, 5)
        return x[:, :, rows][:, :, :, cols]
    with torch.no_grad():
        views = [model(moved(dy, dx)).softmax(-1) for dy, dx in ((0, 0), (1, 0), (-1, 0), (0, 1), (0, -1))]
    tta = evaluate(model, [(x[:17], y[:17]), (x[17:], y[17:])], 5, CPU, tta="shift")
    assert_summary(tta, expected_metrics(sum(views) / 5, y))
    assert abs(tta["loss"] - evaluate(model, [(x, y)], 5, CPU)["loss"]) > 0.05  # the shifts matter to this model
    assert_summary(evaluate(model, [(x, y)], 5, CPU, tta=True),  # True: the flip of before
                   expected_metrics((views[0] + model(x.flip(-1)).softmax(-1)) / 2, y))
    with pytest.raises(ConfigError, match=r"'rotate' is not one of \['flip', 'flip-shift', 'shift'\]"):
        evaluate(model, [(x, y)], 5, CPU, tta="rotate")


def test_flip_shift_tta_averages_ten_views_each_shift_and_its_mirror():
    g = torch.Generator().manual_seed(5)
    x = torch.rand(24, 2, 5, 4, generator=g)  # H != W and two channels
    y = torch.randint(0, 6, (24,), generator=g)
    model = Linear((2, 5, 4), 6)

    def view(dy, dx, mirrored):  # built by indexing: content moved dy down, dx right, then mirrored
        rows = (torch.arange(5) - dy).clamp(0, 4)
        cols = (torch.arange(4) - dx).clamp(0, 3)
        if mirrored:
            cols = cols.flip(0)
        return x[:, :, rows][:, :, :, cols]
    with torch.no_grad():
        probs = [model(view(dy, dx, m)).softmax(-1) for m in (False, True)
                 for dy, dx in ((0, 0), (1, 0), (-1, 0), (0, 1), (0, -1))]
    tta = evaluate(model, [(x[:10], y[:10]), (x[10:], y[10:])], 6, CPU, tta="flip-shift")
    assert_summary(tta, expected_metrics(sum(probs) / 10, y))
    for other in ("flip", "shift"):  # both halves matter to this model
        assert abs(tta["loss"] - evaluate(model, [(x, y)], 6, CPU, tta=other)["loss"]) > 0.01


def test_model_mode_is_restored_and_empty_input_is_an_error():
    model = Linear((1, 2, 2), 3).train()
    evaluate(model, [(torch.rand(4, 1, 2, 2), torch.tensor([0, 1, 2, 0]))], 3, CPU)
    assert model.training
    with pytest.raises(DataError, match="no images"):
        evaluate(model, [], 3, CPU)


def test_reliability_bins_by_hand():
    conf = torch.tensor([0.95, 0.97, 0.05, 0.5])
    correct = torch.tensor([True, False, False, True])
    rel = reliability_bins(conf, correct)
    assert len(rel["edges"]) == 16 and len(rel["count"]) == 15
    # 0.95 and 0.97 fall in bin 14 (0.933-1), 0.05 in bin 0, 0.5 in bin 7 (0.467-0.533)
    assert rel["count"][14] == 2 and rel["count"][0] == 1 and rel["count"][7] == 1 and sum(rel["count"]) == 4
    assert rel["confidence"][14] == pytest.approx(0.96) and rel["accuracy"][14] == pytest.approx(0.5)
    assert rel["accuracy"][0] == 0 and rel["accuracy"][7] == 1 and rel["confidence"][3] is None
    assert rel["ece"] == pytest.approx((abs(1.92 - 1) + 0.05 + 0.5) / 4)
    with pytest.raises(DataError, match="at least one image"):
        reliability_bins(torch.tensor([]), torch.tensor([]))


def test_confusion_png_takes_class_names_literally(tmp_path):
    """A "$" in a class name would start matplotlib's math text ("$\\frac" fails to parse)."""
    from PIL import Image

    from vitlab.evaluate import save_confusion_png
    path = tmp_path / "c.png"
    assert save_confusion_png([[3, 1], [0, 2]], ["$\\frac", "a$b"], path)
    with Image.open(path) as im:
        assert im.format == "PNG"
