"""Hostile and careless inputs to the data side: image files for `predict` and image folders, IDX files,
dataset archives. Each case works, or ends in one clear line (CLI exit 2, no traceback), or is a typed
error naming the file; none allocates more than the output needs or blocks on a FIFO."""
from __future__ import annotations

import gzip
import io
import multiprocessing
import os
import pickle
import signal
import struct
import sys
import tarfile
import time
import zlib
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import vitlab
from vitlab.cli import main
from vitlab.data import folders, load_dataset, sources
from vitlab.errors import DataError, ImageError, ImageTooLargeError

from conftest import refusal

posix_only = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="FIFOs and devices are POSIX")


@contextmanager
def no_hang(seconds: int = 10):
    """Fail (instead of blocking the suite) if the body takes longer than `seconds`."""
    def fail(*_):
        raise AssertionError(f"blocked for more than {seconds} s")
    old = signal.signal(signal.SIGALRM, fail)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("model") / "micro"
    vitlab.save_model(vitlab.create_model("vit_micro_patch4_32"), d)
    return d


def cli(capsys, *args) -> tuple[int, str, str]:
    """(exit code, stdout, stderr), less predict's notice that it exported the model for onnxruntime: that
    comes once per model, whichever test runs first (tests/test_export.py covers it)."""
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    err = "".join(line for line in err.splitlines(keepends=True) if not line.startswith("vitlab predict: exporting "))
    return rc, out, err


def png(path: Path, arr: np.ndarray, mode: str | None = None) -> Path:
    Image.fromarray(arr, mode).save(path)
    return path


def decode(path, size=32, channels=3) -> np.ndarray:
    return folders.decode_image(path, size, channels)


# ---- item 1: thin images, aspect ratio, big-but-legal JPEGs -------------------------------------
@pytest.mark.parametrize("shape", [(1, 300_000), (300_000, 1)], ids=["wide", "tall"])
def test_thin_image_is_refused_from_its_header(tmp_path, shape):
    f = png(tmp_path / "thin.png", np.zeros(shape, np.uint8))
    assert f.stat().st_size < 2000  # a few hundred bytes that once asked for GBs
    with pytest.raises(ImageTooLargeError, match=r"aspect ratio of 300,000:1, beyond the 50:1 limit"):
        decode(f)


def test_thin_image_in_predict_is_one_line(tmp_path, capsys, model_dir):
    f = png(tmp_path / "thin.png", np.zeros((1, 3_000_000), np.uint8))
    t = time.perf_counter()
    rc, out, err = cli(capsys, "predict", model_dir, f)
    assert time.perf_counter() - t < 5
    refusal(rc, err, "thin.png", "3000000x1", "50:1")


def test_panorama_within_the_limit_gives_its_centre_square(tmp_path):
    img = np.zeros((100, 4000, 3), np.uint8)  # 40:1
    img[:, 1950:2050, 1] = 255  # a green centre square, red everywhere else
    img[:, :1950, 0] = img[:, 2050:, 0] = 255
    out = decode(png(tmp_path / "pano.png", img))
    assert out.shape == (3, 32, 32)
    assert out[1].mean() > 250 and out[0].mean() < 5


def test_every_resize_is_bounded_by_its_output(tmp_path, monkeypatch):
    """The centre square is cut out before resizing: with resize-then-crop, a 1000x20 image at size
    224 made an 11200x224 intermediate."""
    from PIL import Image as PILImage
    sizes = []
    real = PILImage.Image.resize

    def spy(self, size, *a, **k):
        sizes.append(size)
        return real(self, size, *a, **k)
    monkeypatch.setattr(PILImage.Image, "resize", spy)
    out = decode(png(tmp_path / "w.png", np.zeros((20, 1000, 3), np.uint8)), size=224)
    assert out.shape == (3, 224, 224) and sizes and all(s == (224, 224) for s in sizes)


def test_big_jpeg_is_decoded_at_a_reduced_scale(tmp_path, monkeypatch):
    """draft(): a JPEG over the pixel limit still decodes when its 1/8 scale is within it; a PNG
    of the same size (no reduced decoding) is refused."""
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (1600, 1600, 3), dtype=np.uint8)
    Image.fromarray(img).save(tmp_path / "big.jpg", quality=80)
    png(tmp_path / "big.png", img)
    monkeypatch.setattr(folders, "MAX_PIXELS", 1_000_000)
    assert decode(tmp_path / "big.jpg").shape == (3, 32, 32)  # decoded at 200x200
    with pytest.raises(ImageTooLargeError, match="1600x1600 = 2,560,000 pixels"):
        decode(tmp_path / "big.png")


def test_one_pixel_image_is_upscaled(tmp_path):
    f = tmp_path / "1x1.png"
    Image.new("RGB", (1, 1), (200, 10, 10)).save(f)
    out = decode(f)
    assert out.shape == (3, 32, 32) and (out[:, 5, 7] == [200, 10, 10]).all()


# ---- item 2: bit depth, alpha, palettes, CMYK, EXIF ---------------------------------------------
GRADIENT16 = np.tile(np.linspace(0, 65535, 64).astype(np.uint16), (64, 1))  # mean 32767.5


@pytest.mark.parametrize("name,array", [
    ("g16.png", GRADIENT16),
    ("g16.tif", GRADIENT16),
    ("i32_16bit_values.tif", GRADIENT16.astype(np.int32)),
    ("i32_8bit_values.tif", (GRADIENT16 // 257).astype(np.int32)),
    ("i32_wide.tif", GRADIENT16.astype(np.int32) * 1000 - 7),
    ("f_unit.tif", GRADIENT16.astype(np.float32) / 65535),
    ("f_255.tif", GRADIENT16.astype(np.float32) / 257),
    ("f_signed.tif", GRADIENT16.astype(np.float32) / 32767.5 - 1),
])
def test_high_bit_depth_images_keep_their_tones(tmp_path, name, array):
    """A 16-bit gradient came out with mean 254 (Pillow's convert clips at 255)."""
    f = tmp_path / name
    Image.fromarray(array).save(f)
    for channels in (1, 3):
        out = decode(f, channels=channels)
        assert abs(out.mean() - 127.5) < 2, (name, out.mean())
        assert out.min() <= 5 and out.max() >= 250


def test_float_image_with_nan_and_inf(tmp_path):
    a = GRADIENT16.astype(np.float32) / 65535
    a[:, :4] = np.nan
    a[:, -4:] = np.inf
    out = decode(png(tmp_path / "nan.tif", a), size=64, channels=1)[0]
    assert out[:, 0].max() == 0 and out[:, -1].min() == 255 and 100 < out[:, 20:44].mean() < 155


def test_16bit_png_in_an_image_folder(tmp_path):
    for c in ("a", "b"):
        (tmp_path / "d" / c).mkdir(parents=True)
        for i in range(5):
            png(tmp_path / "d" / c / f"{i}.png", GRADIENT16)
    ds = load_dataset(tmp_path / "d", "train", image_size=16, channels=1)
    assert abs(ds.images.float().mean().item() - 127.5) < 3


@pytest.mark.parametrize("make", [
    lambda f: Image.fromarray(np.zeros((40, 40, 4), np.uint8)).save(f),  # RGBA, fully transparent black
    lambda f: Image.new("LA", (40, 40), (0, 0)).save(f),
    lambda f: (lambda p: (p.putpalette([0, 0, 0] * 256), p.save(f, transparency=0)))(Image.new("P", (40, 40), 0)),
    lambda f: Image.new("L", (40, 40), 0).save(f, transparency=0),
], ids=["RGBA", "LA", "P+transparency", "L+transparency"])
def test_transparency_is_composited_over_white(tmp_path, make):
    f = tmp_path / "t.png"
    make(f)
    assert decode(f).min() == 255 and decode(f, channels=1).min() == 255


@pytest.mark.parametrize("mode,value,expected", [("CMYK", (0, 0, 0, 0), 255), ("CMYK", (0, 0, 0, 255), 0),
                                                 ("1", 1, 255), ("P", 3, 90)])
def test_other_modes_are_converted(tmp_path, mode, value, expected):
    im = Image.new(mode, (30, 20), value)
    if mode == "P":
        im.putpalette([90, 90, 90] * 256)
    f = tmp_path / ("x.jpg" if mode == "CMYK" else "x.png")
    im.save(f)
    out = decode(f)
    assert abs(out.astype(int).mean() - expected) <= 2


def test_exif_orientation_is_applied(tmp_path):
    a = np.zeros((20, 40, 3), np.uint8)
    a[:, :20] = 255  # stored: left half white; orientation 6 = shown rotated 90 degrees clockwise
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(a).save(tmp_path / "phone.jpg", exif=exif, quality=95)
    out = decode(tmp_path / "phone.jpg", size=16, channels=1)[0]
    assert out[:6].mean() > 240 and out[-6:].mean() < 15  # the white half is now on top


# ---- files that are not images --------------------------------------------------------------------
@pytest.mark.parametrize("name,content,reason", [
    ("empty.png", b"", r"empty file \(0 bytes\)"),
    ("text.png", b"just some text\n", "not an image file"),
    ("half.png", None, "truncated"),
    ("half.jpg", None, "truncated"),
])
def test_broken_files_are_reported_with_a_reason(tmp_path, name, content, reason):
    f = tmp_path / name
    if content is None:  # the first half of a real image
        buf = io.BytesIO()
        Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(
            buf, "PNG" if name.endswith("png") else "JPEG")
        content = buf.getvalue()[: len(buf.getvalue()) // 2]
    f.write_bytes(content)
    with pytest.raises(ImageError, match=reason) as e:
        decode(f)
    assert e.value.path == str(f)


@posix_only
def test_fifo_and_device_are_not_opened(tmp_path):
    os.mkfifo(tmp_path / "pipe.png")
    with no_hang():
        with pytest.raises(ImageError, match=r"not a regular file \(a FIFO\)"):
            decode(tmp_path / "pipe.png")
        with pytest.raises(ImageError, match=r"not a regular file \(a character device\)"):
            decode("/dev/zero")


def test_missing_file_and_broken_link(tmp_path):
    with pytest.raises(ImageError, match="no such file"):
        decode(tmp_path / "nope.png")
    (tmp_path / "dangling.png").symlink_to(tmp_path / "gone.png")
    with pytest.raises(ImageError, match="a broken link"):
        decode(tmp_path / "dangling.png")


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root reads any file")
def test_permission_denied_is_a_reason(tmp_path):
    f = png(tmp_path / "secret.png", np.zeros((8, 8), np.uint8))
    f.chmod(0)
    with pytest.raises(ImageError, match="Permission denied"):
        decode(f)


def test_permission_denied_is_skipped_with_its_reason(tmp_path, monkeypatch):
    """The same as above where the suite runs as root: the open itself is refused."""
    root = make_classes(tmp_path / "d")
    real_open = os.open

    def deny(path, *a, **k):
        if str(path).endswith("secret.png"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *a, **k)
    png(root / "a" / "secret.png", np.zeros((8, 8), np.uint8))
    monkeypatch.setattr(os, "open", deny)
    with pytest.warns(UserWarning, match=r"skipped 1 unreadable file\(s\): .*secret.png \(Permission denied\)"):
        arr, kept = folders.decode_files(folders.scan(root)[0], 8, 1, workers=1)
    assert len(arr) == 10


def test_image_errors_pickle_with_path_and_reason():
    for cls in (ImageError, ImageTooLargeError):
        e = pickle.loads(pickle.dumps(cls("/x/a\nb.png", "why")))
        assert type(e) is cls and e.path == "/x/a\nb.png" and e.reason == "why"
        assert str(e) == "/x/a\\nb.png: why"  # one line


def test_process_pool_carries_typed_errors(tmp_path, monkeypatch):
    root = tmp_path / "d"
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(40):
            png(root / c / f"{i}.png", np.full((12, 12), i, np.uint8))
    (root / "a" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    files, labels, classes = folders.scan(root)
    with pytest.warns(UserWarning, match=r"skipped 1 unreadable file\(s\): .*broken.png \(not a readable image"):
        arr, kept = folders.decode_files(files, 8, 1, workers=2)
    assert len(arr) == 80
    png(root / "b" / "thin.png", np.zeros((1, 500), np.uint8))
    files, labels, classes = folders.scan(root)
    with pytest.raises(ImageTooLargeError, match=r"thin.png: image of 500x1 .* refusing to decode it"):
        folders.decode_files(files, 8, 1, workers=2)


def _die(job):
    os._exit(3)  # a worker killed mid-decode (e.g. by the out-of-memory killer)


@pytest.mark.skipif(multiprocessing.get_start_method() != "fork", reason="the patched worker needs fork")
def test_a_dead_worker_is_one_data_error(tmp_path, monkeypatch):
    root = make_classes(tmp_path / "d", n=40)
    files, _, _ = folders.scan(root)
    monkeypatch.setattr(folders, "_decode_or_error", _die)
    with pytest.raises(DataError, match="a process decoding images died .* 80 files under .*/d"):
        folders.decode_files(files, 8, 1, workers=2)


def png_header(w: int, h: int) -> bytes:
    """A PNG that declares w x h and holds no pixels: what a decompression bomb's header looks like."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)) + chunk(b"IEND", b"")


@pytest.mark.parametrize("w,h,match", [(20000, 20000, "exceeds"), (9000, 9000, "81,000,000 pixels exceeds")])
def test_bomb_header_is_refused_before_decoding(tmp_path, w, h, match):
    f = tmp_path / "bomb.png"
    f.write_bytes(png_header(w, h))
    with pytest.raises(ImageTooLargeError, match=match):
        decode(f)


def test_animated_gif_gives_its_first_frame(tmp_path):
    frames = [Image.new("L", (20, 20), v) for v in (200, 10, 10)]
    frames[0].save(tmp_path / "a.gif", save_all=True, append_images=frames[1:])
    assert abs(int(decode(tmp_path / "a.gif", channels=1).mean()) - 200) <= 2


# ---- predict on the command line ------------------------------------------------------------------
@posix_only
def test_predict_fifo_is_not_a_regular_file(tmp_path, capsys, model_dir):
    os.mkfifo(tmp_path / "pipe")
    with no_hang():
        rc, out, err = cli(capsys, "predict", model_dir, tmp_path / "pipe")
    refusal(rc, err, "pipe", "not a regular file (a FIFO)")
    assert "no such file" not in err


def test_predict_folder_without_images(tmp_path, capsys, model_dir):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "readme.txt").write_text("hi")
    rc, out, err = cli(capsys, "predict", model_dir, tmp_path / "docs")
    refusal(rc, err, "docs", "a folder without image files")


def test_predict_missing_path(tmp_path, capsys, model_dir):
    rc, out, err = cli(capsys, "predict", model_dir, tmp_path / "nope.png")
    refusal(rc, err, "nope.png", "no such file or folder")


def test_predict_reports_bad_files_and_predicts_the_rest(tmp_path, capsys, model_dir):
    good = png(tmp_path / "good.png", np.zeros((32, 32, 3), np.uint8))
    (tmp_path / "bad.png").write_text("not an image")
    rc, out, err = cli(capsys, "predict", model_dir, good, tmp_path / "bad.png")
    assert rc == 3 and len(out.splitlines()) == 2 and "good.png" in out  # 3: partial
    assert err.count("\n") == 1 and "skipped" in err and "bad.png: not an image file" in err


def test_newline_in_a_file_name_does_not_fake_table_rows(tmp_path, capsys, model_dir):
    d = tmp_path / "imgs"
    d.mkdir()
    fake = "a.png\nfake.png  9 1.000  3 0.100.png"  # a second line that looks like a row
    png(d / fake, np.zeros((32, 32, 3), np.uint8))
    png(d / "b\x1b[31m.png", np.zeros((32, 32, 3), np.uint8))
    rc, out, err = cli(capsys, "predict", model_dir, d)
    assert rc == 0, err
    lines = out.splitlines()
    assert len(lines) == 3 and "a.png\\nfake.png" in out and "\\x1b[31m" in out and "\x1b" not in out
    rc, out, err = cli(capsys, "predict", model_dir, d, "--format", "csv")
    import csv
    rows = list(csv.reader(io.StringIO(out)))
    assert {r[0] for r in rows[1:]} == {str(d / fake), str(d / "b\x1b[31m.png")}


@pytest.mark.skipif(sys.platform != "linux", reason="file names are bytes on Linux")
def test_non_utf8_file_name(tmp_path, capsys, model_dir):
    name = os.fsdecode(b"caf\xe9.png")  # Latin-1, not UTF-8: a surrogate in the str
    png(tmp_path / name, np.zeros((32, 32, 3), np.uint8))
    for fmt in ("table", "csv", "json"):
        rc, out, err = cli(capsys, "predict", model_dir, tmp_path, "--format", fmt)
        assert rc == 0, err
        out.encode("utf-8")  # printable on a UTF-8 terminal
        assert "caf\\udce9.png" in out or "caf\\\\udce9.png" in out


# ---- item 3: image folders: unusable classes, links, odd layouts -----------------------------------
def make_classes(root: Path, classes=("a", "b"), n=5) -> Path:
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            png(root / c / f"{i}.png", np.full((10, 10, 3), 20 * i % 256, np.uint8))
    return root


def test_class_of_unreadable_files_is_an_error(tmp_path):
    root = make_classes(tmp_path / "d", n=10)
    (root / "c").mkdir()
    for i in range(10):
        (root / "c" / f"{i}.png").write_text("not an image")
    with pytest.raises(DataError, match=r"class 'c' \(.*d/c\) has no usable image: none of its \d+ file\(s\)"):
        load_dataset(root, "train", image_size=8)


def test_class_linked_to_a_system_folder_is_refused_not_walked(tmp_path):
    root = make_classes(tmp_path / "d")
    (root / "etc").symlink_to("/etc")
    (root / "everything").symlink_to("/")
    t = time.perf_counter()
    with pytest.raises(DataError, match=r"class folder .*/d/etc links to /etc, outside .*does not follow links"):
        load_dataset(root, "train", image_size=8)
    assert time.perf_counter() - t < 2


def test_class_linked_to_its_own_root_is_refused(tmp_path):
    root = make_classes(tmp_path / "d")
    (root / "loop").symlink_to(".")
    with pytest.raises(DataError, match="loop links to"):
        folders.scan(root)


def test_class_linked_inside_the_dataset_is_fine(tmp_path):
    root = make_classes(tmp_path / "d")
    make_classes(tmp_path / "d" / ".store", classes=("c",))
    (root / "c").symlink_to(root / ".store" / "c")
    files, labels, classes = folders.scan(root)
    assert classes == ["a", "b", "c"] and labels.count(2) == 5


def test_linked_subfolder_is_not_followed(tmp_path):
    root = make_classes(tmp_path / "d")
    outside = make_classes(tmp_path / "elsewhere", classes=("x",))
    (root / "a" / "more").symlink_to(outside / "x")
    with pytest.warns(UserWarning, match="more \\(a linked folder"):
        files, labels, _ = folders.scan(root)
    assert len(files) == 10


def test_hidden_folders_inside_a_class_are_skipped(tmp_path):
    root = make_classes(tmp_path / "d")
    (root / "a" / ".ipynb_checkpoints").mkdir()
    png(root / "a" / ".ipynb_checkpoints" / "0-checkpoint.png", np.zeros((4, 4), np.uint8))
    assert len(folders.scan(root)[0]) == 10


@posix_only
def test_fifo_inside_a_class_is_skipped_not_read(tmp_path):
    root = make_classes(tmp_path / "d")
    os.mkfifo(root / "a" / "pipe.png")
    with no_hang(), pytest.warns(UserWarning, match=r"pipe.png \(not a regular file \(a FIFO\)\)"):
        ds = load_dataset(root, "train", image_size=8, val_size=2)
    assert len(ds) > 0


def test_dataset_path_that_is_a_file(tmp_path):
    f = tmp_path / "data.png"
    f.write_text("x")
    with pytest.raises(DataError, match="is not a folder"):
        load_dataset(f, "train")


# ---- item 10/11: IDX headers, archives, data fetch ------------------------------------------------
def idx_bytes(ndim: int, dims: tuple[int, ...], body: bytes = b"") -> bytes:
    return bytes([0, 0, 8, ndim]) + struct.pack(f">{len(dims)}I", *dims) + body


@pytest.mark.parametrize("data,match", [
    (idx_bytes(255, ()), "declares 255 dimensions"),
    (idx_bytes(0, ()), "declares 0 dimensions"),
    (idx_bytes(3, (60000, 28)), "truncated inside its header"),
    (idx_bytes(3, (0xFFFFFFFF,) * 3), "over the .*-byte limit"),
    (idx_bytes(3, (65535, 65535, 2)), "truncated or has trailing bytes"),
    (idx_bytes(1, (3,), b"\x01\x02\x03\x04"), "truncated or has trailing bytes"),
    (b"\x00\x00\x0d\x01", "not an unsigned-byte IDX file"),
    (b"", "magic empty"),
], ids=["ndim255", "ndim0", "short-header", "huge-dims", "claims-more", "trailing", "float-idx", "empty"])
@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gz"])
def test_bad_idx_header_is_one_data_error(tmp_path, data, match, gz):
    f = tmp_path / "train-images-idx3-ubyte"
    f.write_bytes(gzip.compress(data) if gz else data)
    t = time.perf_counter()
    with pytest.raises(DataError, match=match):
        sources.read_idx(f)
    assert time.perf_counter() - t < 2


def test_bad_idx_folder_on_the_command_line(tmp_path, capsys):
    d = tmp_path / "idx"
    d.mkdir()
    (d / "train-images-idx3-ubyte").write_bytes(idx_bytes(255, ()))
    (d / "train-labels-idx1-ubyte").write_bytes(idx_bytes(1, (1,), b"\x00"))
    rc, out, err = cli(capsys, "train", "--recipe", "mnist", "--set", f"data.name={d}", "--set", "train.epochs=1",
                       "--out", tmp_path / "run")
    refusal(rc, err, "255 dimensions")


@posix_only
def test_idx_file_that_is_a_fifo(tmp_path):
    os.mkfifo(tmp_path / "train-images-idx3-ubyte")
    with no_hang(), pytest.raises(DataError, match="not a regular file"):
        sources.read_idx(tmp_path / "train-images-idx3-ubyte")


def tar_with(*members: tarfile.TarInfo) -> tarfile.TarFile:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for m in members:
            tar.addfile(m, io.BytesIO(b"x" * m.size) if m.isfile() else None)
    buf.seek(0)
    return tarfile.open(fileobj=buf)


def member(name: str, kind: bytes = tarfile.REGTYPE, link: str = "", size: int = 1, mode: int = 0o644):
    m = tarfile.TarInfo(name)
    m.type, m.linkname, m.size, m.mode = kind, link, size if kind == tarfile.REGTYPE else 0, mode
    return m


@pytest.mark.parametrize("with_filter", [True, False], ids=["data-filter", "no-filter (py<3.11.4)"])
@pytest.mark.parametrize("bad", [
    member("../unpacked_x/y"),  # passes a string-prefix test against .../unpacked
    member("/tmp/abs"),
    member("a/../../escape"),
    member("link", tarfile.SYMTYPE, "/etc/passwd"),
    member("hard", tarfile.LNKTYPE, "a/ok"),
    member("dev", tarfile.CHRTYPE),
    member("fifo", tarfile.FIFOTYPE),
], ids=["sibling-prefix", "absolute", "dotdot", "symlink", "hardlink", "device", "fifo"])
def test_safe_extract_refuses_escapes_links_and_devices(tmp_path, monkeypatch, bad, with_filter):
    if not with_filter:
        monkeypatch.delattr(tarfile, "data_filter", raising=False)
    dest = tmp_path / "unpacked"
    with pytest.raises(DataError, match="refusing to extract"):
        sources._safe_extract(tar_with(member("a/ok"), bad), dest)
    assert not (tmp_path / "unpacked_x").exists() and not list(dest.rglob("*"))  # nothing half-extracted


@pytest.mark.parametrize("with_filter", [True, False], ids=["data-filter", "no-filter"])
def test_safe_extract_writes_plain_files_without_archive_modes(tmp_path, monkeypatch, with_filter):
    if not with_filter:
        monkeypatch.delattr(tarfile, "data_filter", raising=False)
    sources._safe_extract(tar_with(member("d", tarfile.DIRTYPE), member("d/f", size=3, mode=0o4777)), tmp_path / "u")
    f = tmp_path / "u" / "d" / "f"
    assert f.read_bytes() == b"xxx" and not f.stat().st_mode & 0o4000  # no setuid from the archive


def test_fetch_into_a_data_dir_that_is_a_file(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("VITLAB_DATA", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setattr(sources, "_download", lambda *a, **k: pytest.fail("no download may start"))
    (tmp_path / "notadir").write_text("x")
    rc, out, err = cli(capsys, "data", "fetch", "mnist", "--data-dir", tmp_path / "notadir", "--quiet")
    refusal(rc, err, "notadir is not a folder")


@posix_only
def test_verify_reports_a_fifo_in_place_of_a_dataset_file(tmp_path):
    os.mkfifo(tmp_path / "test.bin")
    with no_hang(), pytest.raises(DataError, match="is not a regular file"):
        sources.verify_file(tmp_path / "test.bin", sources.FileSpec("test.bin", md5="0" * 32), "cifar100")
