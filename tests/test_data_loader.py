import pytest
import torch

from vitlab import ConfigError, ViTConfig
from vitlab.data import ImageSet
from vitlab.data.augment import (AugmentArgs, EvalTransform, TrainTransform, elastic_displacement, mix, pad_crop,
                                 rand_augment, random_erase, random_rotation_zoom, rotation_zoom)
from vitlab.data.loader import BatchLoader


def fake_set(n=100, c=3, size=8, classes=10):
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, c, size, size), generator=g, dtype=torch.uint8)
    return ImageSet(images, torch.arange(n) % classes, [str(i) for i in range(classes)], "fake", "train",
                    (0.5,) * c, (0.25,) * c)


def plain(x, y, gen):
    return x, y


def record(data, **kw):
    """The preprocessing record a model trained on `data` would carry (8-px images, its stats)."""
    c = data.images.shape[1]
    return ViTConfig(img_size=data.images.shape[-1], patch_size=4, in_chans=c, embed_dim=32, depth=1, num_heads=2,
                     num_classes=len(data.classes), mean=data.mean, std=data.std, **kw)


def test_each_epoch_is_a_permutation_and_reproducible():
    data = fake_set(100, classes=100)  # label i is image i: the labels name the images
    loader = BatchLoader(data, 10, train=True, transform=plain, seed=3)
    assert len(loader) == 10
    batches = list(loader)
    first = torch.cat([y for _, y in batches])
    assert sorted(first.tolist()) == list(range(100))  # every image once
    assert not torch.equal(first, torch.arange(100))  # shuffled
    assert torch.equal(torch.cat([x for x, _ in batches]), data.images[first])  # each image with its label
    again = torch.cat([y for _, y in BatchLoader(data, 10, True, plain, seed=3)])
    assert torch.equal(first, again)
    loader.set_epoch(1)
    assert not torch.equal(torch.cat([y for _, y in loader]), first)


def test_drop_last_and_eval_keeps_everything():
    data = fake_set(95, classes=95)
    train = list(BatchLoader(data, 10, True, plain))
    assert len(BatchLoader(data, 10, True, plain)) == len(train) == 9 and all(len(y) == 10 for _, y in train)
    ev = BatchLoader(data, 10, False, plain)
    assert len(ev) == 10
    assert torch.cat([y for _, y in ev]).tolist() == list(range(95))  # in order, the last batch short


def test_ranks_get_disjoint_equal_shards():
    data = fake_set(101)
    seen = []
    for rank in range(2):
        loader = BatchLoader(data, 10, True, lambda x, y, g: (x, torch.arange(len(y))), seed=1, rank=rank, world_size=2)
        idx = loader._indices()
        assert len(idx) == 50 and len(loader) == 5
        seen.append(set(idx.tolist()))
    assert not seen[0] & seen[1] and len(seen[0] | seen[1]) == 100  # one image left out: 101 is odd
    ev = [set(BatchLoader(data, 10, False, plain, rank=r, world_size=2)._indices().tolist()) for r in range(2)]
    assert ev[0] | ev[1] == set(range(101)) and not ev[0] & ev[1]


def test_resume_mid_epoch_gives_the_same_batches():
    data = fake_set(100)
    tf = TrainTransform(AugmentArgs(randaug_ops=2, erase_prob=0.5), record(data))
    full = list(BatchLoader(data, 10, True, tf, seed=5))
    resumed = BatchLoader(data, 10, True, tf, seed=5)
    resumed.set_epoch(0, start_batch=6)
    rest = list(resumed)
    assert len(rest) == 4
    for (xa, ya), (xb, yb) in zip(full[6:], rest):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_loader_argument_checks():
    with pytest.raises(ConfigError, match="batch_size=200 per rank exceeds the 100"):
        BatchLoader(fake_set(100), 200, True, plain)
    with pytest.raises(ConfigError, match="rank=2"):
        BatchLoader(fake_set(100), 10, True, plain, rank=2, world_size=2)


def test_pad_crop_shifts_each_image_within_the_padding():
    x = torch.zeros(400, 1, 8, 8)
    x[:, :, 3, 3] = 1.0  # a single bright pixel
    y = pad_crop(x, 2, torch.Generator().manual_seed(0))
    pos = y.flatten(1).argmax(1)
    rows, cols = pos // 8, pos % 8
    # every shift of up to 2 pixels each way occurs, and no other (400 draws miss none of 25)
    assert set(zip(rows.tolist(), cols.tolist())) == {(r, c) for r in range(1, 6) for c in range(1, 6)}
    assert torch.equal(y.sum((1, 2, 3)), torch.ones(400))  # the pixel is never cropped away


def test_rand_augment_stays_in_range_and_changes_images():
    x = torch.rand(64, 3, 16, 16)
    for trivial in (False, True):
        y = rand_augment(x.clone(), 2, 9.0, trivial, torch.Generator().manual_seed(1))
        assert y.shape == x.shape and y.min() >= 0 and y.max() <= 1
        changed = ((y - x).abs().flatten(1).amax(1) > 1e-4).sum().item()
        # an image stays as it was only where every op drawn was "identity" (1 in 13 per op): 1/169
        # of the images with two ops (~0.4 of 64), 1/13 with TrivialAugment's one (~5 of 64)
        assert changed >= (60 if not trivial else 48), changed
    x = torch.rand(8, 1, 16, 16)
    grey = rand_augment(x.clone(), 2, 9.0, False, torch.Generator().manual_seed(1))
    assert grey.shape == (8, 1, 16, 16) and grey.min() >= 0 and grey.max() <= 1
    assert ((grey - x).abs().flatten(1).amax(1) > 1e-4).sum() >= 7  # one-channel images are augmented too


def test_rotation_and_zoom_turn_and_enlarge_about_the_centre():
    import math
    x = torch.zeros(1, 1, 8, 8)
    x[0, 0, 1, 5] = 1.0  # near the top-right corner
    quarter = rotation_zoom(x, torch.tensor([math.pi / 2]), torch.ones(1))
    torch.testing.assert_close(quarter, torch.rot90(x, 1, (2, 3)))  # counter-clockwise, exactly
    x = torch.rand(3, 2, 8, 8)
    torch.testing.assert_close(rotation_zoom(x, torch.zeros(3), torch.ones(3)), x)  # the identity
    dot = torch.zeros(1, 1, 16, 16)
    dot[0, 0, 6:10, 6:10] = 1.0  # a 4x4 square at the centre
    for zoom in (2.0, 0.5):
        out = rotation_zoom(dot, torch.zeros(1), torch.tensor([zoom]))
        assert out.sum().item() == pytest.approx(16 * zoom**2, rel=0.02)  # area scales with zoom squared
        torch.testing.assert_close(out, out.flip(-1).flip(-2))  # still centred
    # random draws: each image its own angle within +-rotate degrees, reproducible from the generator
    bar = torch.zeros(200, 1, 17, 17)
    bar[:, :, 8, 2:15] = 1.0  # a horizontal bar through the centre
    y = random_rotation_zoom(bar, 20.0, 0.0, torch.Generator().manual_seed(0))
    assert torch.equal(y, random_rotation_zoom(bar, 20.0, 0.0, torch.Generator().manual_seed(0)))
    rows = torch.arange(17.0).view(1, 17, 1)
    yy = y[:, 0]
    ends = (yy[:, :, 2:4] * rows).sum((1, 2)) / yy[:, :, 2:4].sum((1, 2)) - 8  # height of the left end
    slope = ends / 5.5  # tan(angle): the left end sits ~5.5 px from the centre
    angles = torch.rad2deg(torch.atan(slope))
    assert angles.abs().max() < 21 and angles.max() > 15 and angles.min() < -15 and angles.std() > 8


def test_elastic_displacement_moves_pixels_by_the_field_in_pixels():
    x = torch.rand(2, 1, 6, 10)  # not square: a swapped x / y scale would show
    shift = torch.zeros(2, 6, 10, 2)
    shift[..., 0] = 1.0  # every output pixel samples one pixel to its right
    out = rotation_zoom(x, torch.zeros(2), torch.ones(2), shift)
    torch.testing.assert_close(out[..., :-1], x[..., 1:])
    assert out[..., -1].abs().max() == 0  # beyond the border: zeros
    shift = torch.zeros(2, 6, 10, 2)
    shift[..., 1] = -2.0  # two pixels up
    torch.testing.assert_close(rotation_zoom(x, torch.zeros(2), torch.ones(2), shift)[:, :, 2:], x[:, :, :-2])


def test_elastic_field_is_smooth_scaled_by_alpha_and_seeded():
    field = elastic_displacement(64, 28, 28, 34.0, 4.0, torch.Generator().manual_seed(0))
    assert field.shape == (64, 28, 28, 2)
    again = elastic_displacement(64, 28, 28, 17.0, 4.0, torch.Generator().manual_seed(0))
    torch.testing.assert_close(field, 2 * again)  # linear in alpha, same noise from the same seed
    rms = field.pow(2).mean().sqrt().item()
    assert 0.8 < rms < 2.0  # ~1.3 px for Simard's alpha 34, sigma 4: smoothing shrinks the [-1, 1] noise
    step = (field[:, 1:] - field[:, :-1]).pow(2).mean().sqrt().item()
    assert step < 0.25 * rms  # neighbours move together: smooth, not per-pixel noise
    rough = elastic_displacement(64, 28, 28, 34.0, 0.5, torch.Generator().manual_seed(0))
    assert (rough[:, 1:] - rough[:, :-1]).pow(2).mean().sqrt() > 0.5 * rough.pow(2).mean().sqrt()
    with pytest.raises(ConfigError, match="elastic_alpha=-1"):
        AugmentArgs(elastic_alpha=-1)
    for bad in (0.0, float("nan"), 65.0):
        with pytest.raises(ConfigError, match="elastic_sigma"):
            AugmentArgs(elastic_sigma=bad)
    with pytest.raises(ConfigError, match="elastic_alpha=inf"):
        AugmentArgs(elastic_alpha=float("inf"))


def test_elastic_off_leaves_the_random_stream_and_images_of_existing_recipes_alone():
    data = fake_set(32, c=1)
    # flips are drawn after the geometry: an extra draw for a field that is then zeroed would show there
    base = TrainTransform(AugmentArgs(rotate=10, scale=0.1, flip=True), record(data))
    off = TrainTransform(AugmentArgs(rotate=10, scale=0.1, flip=True, elastic_alpha=0.0, elastic_sigma=6.0),
                         record(data))
    on = TrainTransform(AugmentArgs(rotate=10, scale=0.1, flip=True, elastic_alpha=34.0), record(data))
    a = base(data.images, data.labels, torch.Generator().manual_seed(5))[0]
    assert torch.equal(a, off(data.images, data.labels, torch.Generator().manual_seed(5))[0])
    g, expected = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    random_rotation_zoom(torch.rand(32, 1, 8, 8), 10, 0.1, g)
    torch.rand(32, generator=expected), torch.rand(32, generator=expected)  # an angle and a zoom per image, no more
    assert torch.equal(g.get_state(), expected.get_state())
    b, labels = on(data.images, data.labels, torch.Generator().manual_seed(5))
    assert torch.equal(labels, data.labels) and (a - b).abs().mean() > 0.05
    alone = TrainTransform(AugmentArgs(crop_pad=0, flip=False, elastic_alpha=34.0), record(data))
    plain_tf = TrainTransform(AugmentArgs(crop_pad=0, flip=False), record(data))
    assert not torch.equal(alone(data.images, data.labels, torch.Generator().manual_seed(5))[0],
                           plain_tf(data.images, data.labels, torch.Generator().manual_seed(5))[0])  # on by itself too


def test_augmentation_is_seeded():
    data = fake_set(32)
    tf = TrainTransform(AugmentArgs(rotate=15, scale=0.1, randaug_ops=2, mixup_alpha=0.8, cutmix_alpha=1.0,
                                    erase_prob=0.25),
                        record(data))
    a = tf(data.images, data.labels, torch.Generator().manual_seed(7))
    b = tf(data.images, data.labels, torch.Generator().manual_seed(7))
    c = tf(data.images, data.labels, torch.Generator().manual_seed(8))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and not torch.equal(a[0], c[0])


def test_mixup_and_cutmix_targets_sum_to_one_and_match_the_mix():
    x = torch.zeros(4, 1, 10, 10)
    x[2:] = 1.0  # images 0, 1 black; 2, 3 white; partners are the reversed batch
    y = torch.tensor([0, 1, 2, 3])
    for cfg in (AugmentArgs(mixup_alpha=1.0), AugmentArgs(cutmix_alpha=1.0)):
        mixed, target = mix(x, y, 4, cfg, torch.Generator().manual_seed(3))
        torch.testing.assert_close(target.sum(1), torch.ones(4))
        # the white fraction of image 0 is exactly the weight of its white partner (class 3)
        torch.testing.assert_close(mixed[0].mean(), target[0, 3])


def test_random_erasing_fills_rectangles():
    x = torch.zeros(200, 3, 16, 16)
    y = random_erase(x, 0.5, torch.Generator().manual_seed(0))
    erased = (y != 0).flatten(1).any(1)
    assert 0.35 < erased.float().mean() < 0.65
    frac = (y != 0)[:, 0].flatten(1).float().mean(1)[erased]
    assert frac.min() > 0.005 and frac.max() < 0.45


def test_eval_transform_follows_the_model_record():
    cfg = ViTConfig(img_size=16, patch_size=4, in_chans=3, embed_dim=32, depth=1, num_heads=2,
                    mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    grey = torch.full((2, 1, 8, 8), 255, dtype=torch.uint8)
    out, labels = EvalTransform(cfg)(grey, torch.tensor([4, 7]))
    assert labels.tolist() == [4, 7]  # the same call as TrainTransform; labels pass through
    assert out.shape == (2, 3, 16, 16)
    torch.testing.assert_close(out, torch.ones(2, 3, 16, 16))  # (1 - 0.5) / 0.5
    red = torch.zeros((2, 3, 16, 16), dtype=torch.uint8)
    red[:, 0] = 255
    g1 = cfg.replace(in_chans=1, mean=(0.0,), std=(1.0,))
    # RGB -> grey with the ITU-R BT.601 luma weights (as Pillow's "L" mode): pure red is 0.299
    torch.testing.assert_close(EvalTransform(g1)(red)[0], torch.full((2, 1, 16, 16), 0.299))


def test_augment_config_validation():
    with pytest.raises(ConfigError, match="erase_prob=1.5"):
        AugmentArgs(erase_prob=1.5)
    with pytest.raises(ConfigError, match="randaug_magnitude=11"):
        AugmentArgs(randaug_magnitude=11)
    with pytest.raises(ConfigError, match=r"rotate=200.*\[0, 180\] degrees.*scale=1.0 must be in \[0, 1\)"):
        AugmentArgs(rotate=200, scale=1.0)
    with pytest.raises(ConfigError, match="rotate=nan"):
        AugmentArgs(rotate=float("nan"))
