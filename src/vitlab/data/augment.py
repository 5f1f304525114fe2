"""Batched tensor augmentation: every op works on a whole (B, C, H, W) batch at once, with
per-sample randomness drawn from one torch.Generator, so a batch is reproducible from its seed.

Order: uint8 -> [0, 1] float -> pad + random crop -> rotation + zoom + elastic distortion (one resampling)
-> horizontal flip -> RandAugment-style ops -> normalise -> random erasing -> mixup / cutmix (soft targets).
The evaluation transform is built from a model's preprocessing record (resize, channels, mean/std), so it
always matches the model.

References: elastic distortion (Simard et al., "Best practices for convolutional neural networks applied to
visual document analysis", ICDAR 2003), RandAugment (arXiv 1909.13719), TrivialAugment (arXiv 2103.10158),
mixup (arXiv 1710.09412), CutMix (arXiv 1905.04899), random erasing (arXiv 1708.04896).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ConfigError

COLOR_OPS = ("identity", "autocontrast", "brightness", "color", "contrast", "sharpness", "solarize", "posterize")
GEOMETRIC_OPS = ("rotate", "shear_x", "shear_y", "translate_x", "translate_y")
OPS = COLOR_OPS + GEOMETRIC_OPS


MAX_CROP_PAD = 1024  # pixels; `vitlab train` also holds it to at most the model's image side
MAX_ELASTIC_SIGMA = 64.0  # pixels: the smoothing kernel has 6 sigma + 1 taps


@dataclass(frozen=True)
class AugmentArgs:
    """Training-time augmentation, applied a whole batch at a time; evaluation never augments."""
    crop_pad: int = 4
    """Zero-pad by this many pixels, then crop back at a random offset (0 disables; at most the image side)."""
    flip: bool = True
    """Random horizontal flips (turn off for digits and text)."""
    rotate: float = 0.0
    """Rotate each image by a random angle in [-rotate, rotate] degrees (0 disables; corners filled with black)."""
    scale: float = 0.0
    """Zoom each image by a random factor in [1 - scale, 1 + scale] (0 disables), with the rotation."""
    elastic_alpha: float = 0.0
    """Elastic distortion strength in pixels (0 disables): a per-pixel random displacement field, smoothed
    by a Gaussian of elastic_sigma pixels and scaled by this (Simard et al. 2003 used 34 with sigma 4 on
    28-px digits)."""
    elastic_sigma: float = 4.0
    """Smoothness of the elastic displacement field: the Gaussian's standard deviation in pixels."""
    randaug_ops: int = 0
    """RandAugment ops applied to each image (0 disables)."""
    randaug_magnitude: float = 9.0
    """RandAugment strength on the 0..10 scale."""
    trivial: bool = False
    """TrivialAugment: one op per image at a uniformly random magnitude (overrides randaug_*)."""
    mixup_alpha: float = 0.0
    """Beta(alpha, alpha) mixing of image pairs (0 disables)."""
    cutmix_alpha: float = 0.0
    """Beta(alpha, alpha) box pasting between image pairs (0 disables)."""
    mix_prob: float = 1.0
    """Probability that a batch is mixed at all when mixup or cutmix is on."""
    erase_prob: float = 0.0
    """Probability of erasing a random rectangle of each image with noise."""

    def __post_init__(self) -> None:
        # Written so that NaN fails every check (`not 0 <= x`), and infinity too (math.isfinite).
        problems = []
        if not 0 <= self.crop_pad <= MAX_CROP_PAD:
            problems.append(f"augment.crop_pad={self.crop_pad} must be in [0, {MAX_CROP_PAD}]")
        if not 0 <= self.randaug_ops <= len(OPS):
            problems.append(f"augment.randaug_ops={self.randaug_ops} must be in [0, {len(OPS)}]")
        if not 0 <= self.randaug_magnitude <= 10:
            problems.append(f"augment.randaug_magnitude={self.randaug_magnitude} must be in [0, 10]")
        if not 0 <= self.rotate <= 180:
            problems.append(f"augment.rotate={self.rotate} must be in [0, 180] degrees")
        if not 0 <= self.scale < 1:
            problems.append(f"augment.scale={self.scale} must be in [0, 1)")
        if not (0 <= self.elastic_alpha and math.isfinite(self.elastic_alpha)):
            problems.append(f"augment.elastic_alpha={self.elastic_alpha} must be a finite number >= 0 (pixels)")
        if not 0 < self.elastic_sigma <= MAX_ELASTIC_SIGMA:
            problems.append(f"augment.elastic_sigma={self.elastic_sigma} must be in (0, {MAX_ELASTIC_SIGMA}] pixels")
        for key in ("mix_prob", "erase_prob"):
            if not 0 <= getattr(self, key) <= 1:
                problems.append(f"augment.{key}={getattr(self, key)} must be in [0, 1]")
        for key in ("mixup_alpha", "cutmix_alpha"):
            value = getattr(self, key)
            if not (0 <= value and math.isfinite(value)):
                problems.append(f"augment.{key}={value} must be a finite number >= 0")
        if problems:
            raise ConfigError("invalid augmentation: " + "; ".join(problems))

    @property
    def mixes(self) -> bool:
        return (self.mixup_alpha > 0 or self.cutmix_alpha > 0) and self.mix_prob > 0


def to_float(images: torch.Tensor) -> torch.Tensor:
    return images.float().div_(255.0)


def normalize(x: torch.Tensor, mean, std) -> torch.Tensor:
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - m) / s


def _uniform(gen: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.rand(*shape, generator=gen)


def pad_crop(x: torch.Tensor, pad: int, gen: torch.Generator) -> torch.Tensor:
    """Zero-pad by `pad`, crop back to H x W at a per-sample random offset (two gathers, no loop)."""
    B, C, H, W = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    rows = torch.randint(0, 2 * pad + 1, (B, 1), generator=gen) + torch.arange(H)  # (B, H)
    cols = torch.randint(0, 2 * pad + 1, (B, 1), generator=gen) + torch.arange(W)  # (B, W)
    x = padded.gather(2, rows[:, None, :, None].expand(B, C, H, W + 2 * pad))  # (B, C, H+2p, W+2p) -> (B, C, H, W+2p)
    return x.gather(3, cols[:, None, None, :].expand(B, C, H, W))  # -> (B, C, H, W)


def hflip(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    mask = _uniform(gen, x.shape[0]) < 0.5
    return torch.where(mask[:, None, None, None], x.flip(-1), x)


def rotation_zoom(x: torch.Tensor, angle: torch.Tensor, zoom: torch.Tensor,
                  displacement: torch.Tensor | None = None) -> torch.Tensor:
    """Each image of the (B, C, H, W) batch rotated counter-clockwise by angle[b] radians and zoomed by
    zoom[b] (> 1 enlarges) about its centre, bilinear, with zeros where no pixel maps. `displacement`
    (B, H, W, 2), in pixels (x, y), moves where each output pixel samples the rotated and zoomed image."""
    B, _, H, W = x.shape
    cos, sin = angle.cos() / zoom, angle.sin() / zoom  # affine_grid maps output to input coordinates
    theta = torch.stack([torch.stack([cos, -sin, torch.zeros(B)], 1),
                         torch.stack([sin, cos, torch.zeros(B)], 1)], 1)  # (B, 2, 3)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)  # (B, H, W, 2), x then y, in [-1, 1]
    if displacement is not None:
        grid = grid + displacement * torch.tensor([2.0 / W, 2.0 / H])  # pixels -> grid units (one pixel = 2/side)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def gaussian_kernel(sigma: float) -> torch.Tensor:
    """A normalised 1-D Gaussian of 2 * ceil(3 sigma) + 1 taps."""
    r = math.ceil(3 * sigma)
    k = torch.exp(-torch.arange(-r, r + 1, dtype=torch.float32) ** 2 / (2 * sigma ** 2))
    return k / k.sum()


def elastic_displacement(B: int, H: int, W: int, alpha: float, sigma: float, gen: torch.Generator) -> torch.Tensor:
    """Simard et al.'s elastic field: per-pixel uniform [-1, 1] noise for x and y, smoothed by a Gaussian
    of `sigma` pixels (separable, zero beyond the border), times `alpha`: (B, H, W, 2) in pixels."""
    field = 2 * _uniform(gen, B, 2, H, W) - 1  # (B, 2, H, W): x and y displacement
    k = gaussian_kernel(sigma)
    r = (len(k) - 1) // 2
    field = F.conv2d(field, k.view(1, 1, -1, 1).expand(2, 1, -1, 1).contiguous(), padding=(r, 0), groups=2)  # along H
    field = F.conv2d(field, k.view(1, 1, 1, -1).expand(2, 1, 1, -1).contiguous(), padding=(0, r), groups=2)  # along W
    return (alpha * field).permute(0, 2, 3, 1)  # (B, 2, H, W) -> (B, H, W, 2)


def random_rotation_zoom(x: torch.Tensor, rotate: float, scale: float, gen: torch.Generator,
                         elastic_alpha: float = 0.0, elastic_sigma: float = 4.0) -> torch.Tensor:
    """Per-image angle uniform in [-rotate, rotate] degrees and zoom uniform in [1 - scale, 1 + scale]
    (the random affine of the classic MNIST recipes; translation comes from pad + crop), and, when
    elastic_alpha > 0, an elastic distortion, all in one resampling."""
    B, _, H, W = x.shape
    angle = (2 * _uniform(gen, B) - 1) * math.radians(rotate)
    zoom = 1 + (2 * _uniform(gen, B) - 1) * scale
    displacement = elastic_displacement(B, H, W, elastic_alpha, elastic_sigma, gen) if elastic_alpha else None
    return rotation_zoom(x, angle, zoom, displacement)


def _grey(x: torch.Tensor) -> torch.Tensor:
    if x.shape[1] == 1:
        return x
    return (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])


def _blend(a: torch.Tensor, b: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """b + factor * (a - b): factor 1 gives a, 0 gives b, beyond 1 extrapolates (PIL ImageEnhance)."""
    return (b + factor.view(-1, 1, 1, 1) * (a - b)).clamp_(0, 1)


def _color_op(name: str, x: torch.Tensor, mag: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    """Apply colour op `name` to every image of x at per-sample magnitude mag in [0, 1]."""
    if name == "identity":
        return x
    if name == "autocontrast":
        lo = x.amin(dim=(2, 3), keepdim=True)
        hi = x.amax(dim=(2, 3), keepdim=True)
        return torch.where(hi > lo, (x - lo) / (hi - lo).clamp_min(1e-6), x)
    factor = 1.0 + sign * 0.9 * mag
    if name == "brightness":
        return _blend(x, torch.zeros_like(x), factor)
    if name == "color":
        return _blend(x, _grey(x).expand_as(x), factor)
    if name == "contrast":
        return _blend(x, _grey(x).mean(dim=(1, 2, 3), keepdim=True).expand_as(x), factor)
    if name == "sharpness":
        C = x.shape[1]
        k = torch.tensor([[1.0, 1.0, 1.0], [1.0, 5.0, 1.0], [1.0, 1.0, 1.0]]) / 13.0  # PIL's smooth kernel
        blurred = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), k.expand(C, 1, 3, 3), groups=C)
        return _blend(x, blurred, factor)
    if name == "solarize":
        threshold = (1.0 - mag).view(-1, 1, 1, 1)
        return torch.where(x >= threshold, 1.0 - x, x)
    if name == "posterize":
        shift = (4.0 * mag).floor().view(-1, 1, 1, 1)  # drop up to 4 of the 8 bits
        step = 2.0**shift
        return torch.floor(x * 255.0 / step) * step / 255.0
    raise ConfigError(f"unknown colour op {name!r}")


def _affine(op_counts: dict[str, torch.Tensor], mag: dict[str, torch.Tensor], sign: dict[str, torch.Tensor],
            B: int) -> torch.Tensor:
    """(B, 2, 3) affine matrices composing each sample's chosen geometric ops (normalised coords)."""
    theta = torch.eye(3).repeat(B, 1, 1)
    for name in GEOMETRIC_OPS:
        on = op_counts[name] > 0
        if not on.any():
            continue
        m = torch.where(on, sign[name] * mag[name], torch.zeros(B))
        t = torch.eye(3).repeat(B, 1, 1)
        if name == "rotate":
            a = m * math.radians(30.0)
            t[:, 0, 0], t[:, 0, 1], t[:, 1, 0], t[:, 1, 1] = a.cos(), -a.sin(), a.sin(), a.cos()
        elif name == "shear_x":
            t[:, 0, 1] = 0.3 * m
        elif name == "shear_y":
            t[:, 1, 0] = 0.3 * m
        elif name == "translate_x":
            t[:, 0, 2] = 0.45 * 2 * m  # normalised coordinates span 2
        elif name == "translate_y":
            t[:, 1, 2] = 0.45 * 2 * m
        theta = t @ theta
    return theta[:, :2]


def rand_augment(x: torch.Tensor, num_ops: int, magnitude: float, trivial: bool, gen: torch.Generator) -> torch.Tensor:
    """RandAugment (num_ops random ops at a fixed magnitude per image) or TrivialAugment (one op at a
    random magnitude), on a [0, 1] batch. Each op runs once over the batch; a per-sample mask keeps
    it only where chosen."""
    B = x.shape[0]
    n = 1 if trivial else num_ops
    choice = torch.randint(0, len(OPS), (B, n), generator=gen)
    counts = {name: (choice == i).sum(1) for i, name in enumerate(OPS)}
    mag = {name: (_uniform(gen, B) if trivial else torch.full((B,), magnitude / 10.0)) for name in OPS}
    sign = {name: torch.where(_uniform(gen, B) < 0.5, -1.0, 1.0) for name in OPS}
    for name in COLOR_OPS[1:]:
        on = counts[name] > 0
        if on.any():
            x = torch.where(on[:, None, None, None], _color_op(name, x, mag[name], sign[name]), x)
    if any(counts[name].any() for name in GEOMETRIC_OPS):
        grid = F.affine_grid(_affine(counts, mag, sign, B), list(x.shape), align_corners=False)
        x = F.grid_sample(x - 0.5, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + 0.5  # grey fill
    return x


def random_erase(x: torch.Tensor, prob: float, gen: torch.Generator) -> torch.Tensor:
    """Replace a random rectangle (2%..33% of the area, aspect 0.3..3.3) with noise, per image
    with probability `prob`. Works on normalised images."""
    B, C, H, W = x.shape
    area = (0.02 + (1 / 3 - 0.02) * _uniform(gen, B)) * H * W
    log_r = math.log(0.3) + (math.log(1 / 0.3) - math.log(0.3)) * _uniform(gen, B)
    h = (area * log_r.exp()).sqrt().round().clamp(1, H)
    w = (area / log_r.exp()).sqrt().round().clamp(1, W)
    top = (_uniform(gen, B) * (H - h + 1)).floor()
    left = (_uniform(gen, B) * (W - w + 1)).floor()
    ys, xs = torch.arange(H).view(1, H, 1), torch.arange(W).view(1, 1, W)
    box = ((ys >= top.view(B, 1, 1)) & (ys < (top + h).view(B, 1, 1))
           & (xs >= left.view(B, 1, 1)) & (xs < (left + w).view(B, 1, 1)))  # (B, H, W)
    box &= (_uniform(gen, B) < prob).view(B, 1, 1)
    noise = torch.randn(x.shape, generator=gen)
    return torch.where(box[:, None], noise, x)


def _beta(alpha: float, gen: torch.Generator) -> float:
    seed = int(torch.randint(0, 2**62, (1,), generator=gen))
    return float(np.random.default_rng(seed).beta(alpha, alpha))


def mix(x: torch.Tensor, y: torch.Tensor, num_classes: int, aug: AugmentArgs,
        gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """mixup or cutmix between each image and its partner in the reversed batch; soft targets."""
    target = F.one_hot(y, num_classes).float()
    if _uniform(gen, 1).item() >= aug.mix_prob:
        return x, target
    use_cutmix = aug.cutmix_alpha > 0 and (aug.mixup_alpha == 0 or _uniform(gen, 1).item() < 0.5)
    partner = x.flip(0)
    if use_cutmix:
        lam = _beta(aug.cutmix_alpha, gen)
        H, W = x.shape[-2:]
        cut_h, cut_w = int(H * math.sqrt(1 - lam)), int(W * math.sqrt(1 - lam))
        cy, cx = int(_uniform(gen, 1).item() * H), int(_uniform(gen, 1).item() * W)
        y0, y1 = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, H)
        x0, x1 = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, W)
        x = x.clone()
        x[:, :, y0:y1, x0:x1] = partner[:, :, y0:y1, x0:x1]
        lam = 1.0 - (y1 - y0) * (x1 - x0) / (H * W)  # the area actually pasted
    else:
        lam = _beta(aug.mixup_alpha, gen)
        x = lam * x + (1 - lam) * partner
    return x, lam * target + (1 - lam) * target.flip(0)


class TrainTransform:
    """uint8 batch + labels -> normalised float batch + targets (class indices, or soft targets
    when mixing), all randomness from `gen`. The model's preprocessing record (`model_cfg`: channels,
    size, mean/std, class count) says what the model expects; `aug` says how to perturb it. Images
    are first brought to the model's channels and size (e.g. 32-px CIFAR for a 224-px model)."""

    def __init__(self, aug: AugmentArgs, model_cfg):
        self.aug = aug
        self.in_chans, self.size = model_cfg.in_chans, model_cfg.img_size
        self.mean, self.std, self.num_classes = tuple(model_cfg.mean), tuple(model_cfg.std), model_cfg.num_classes

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, gen: torch.Generator):
        aug = self.aug
        x = to_model_input(to_float(images), self.in_chans, self.size)
        if aug.crop_pad:
            x = pad_crop(x, aug.crop_pad, gen)
        if aug.rotate or aug.scale or aug.elastic_alpha:
            x = random_rotation_zoom(x, aug.rotate, aug.scale, gen, aug.elastic_alpha, aug.elastic_sigma)
        if aug.flip:
            x = hflip(x, gen)
        if aug.randaug_ops or aug.trivial:
            x = rand_augment(x, aug.randaug_ops, aug.randaug_magnitude, aug.trivial, gen)
        x = normalize(x, self.mean, self.std)
        if aug.erase_prob:
            x = random_erase(x, aug.erase_prob, gen)
        if aug.mixes:
            return mix(x, labels, self.num_classes, aug, gen)
        return x, labels


def to_model_input(x: torch.Tensor, in_chans: int, size: int) -> torch.Tensor:
    """[0, 1] batch -> the channel count and square size a model expects (grey <-> RGB, bicubic)."""
    C = x.shape[1]
    if C != in_chans:
        if C == 1 and in_chans == 3:
            x = x.expand(-1, 3, -1, -1)
        elif C == 3 and in_chans == 1:
            x = _grey(x)
        else:
            raise ConfigError(f"cannot convert {C}-channel images for a {in_chans}-channel model")
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False,
                          antialias=x.shape[-1] > size).clamp_(0, 1)
    return x


class EvalTransform:
    """uint8 batch -> what a model expects, from its preprocessing record (`model_cfg`): channel
    conversion (grey <-> RGB), resize to img_size, normalisation with the model's mean/std.

    Same call as TrainTransform, `(images, labels, gen) -> (inputs, labels)`, so a loader treats
    both alike; labels pass through unchanged and `gen` is unused (nothing here is random)."""

    def __init__(self, model_cfg):
        self.in_chans, self.size = model_cfg.in_chans, model_cfg.img_size
        self.mean, self.std = tuple(model_cfg.mean), tuple(model_cfg.std)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor | None = None,
                 gen: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        return normalize(to_model_input(to_float(images), self.in_chans, self.size), self.mean, self.std), labels
