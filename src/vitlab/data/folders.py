"""Users' own images: `root/<class>/*.png|jpg|...`, optionally under `train/ val/ test/`.

Files are decoded with Pillow in worker processes to the requested channels, centre-cropped to a
square and resized to the model's size, and stacked into one uint8 tensor: after that, folders go
through the same batched in-memory path as MNIST and CIFAR. `predict` decodes with the same function.

Limits, checked on the header before any pixel is decoded (so a 370-byte PNG cannot ask for GBs):
- at most MAX_PIXELS pixels as decoded (JPEGs are first reduced by the decoder, `draft`, to the
  smallest 1/2, 1/4 or 1/8 scale that still covers the output, so a big camera JPEG is cheap);
- an aspect ratio of at most MAX_ASPECT:1 (either way). A 4000x100 panorama gives its centre square;
  a 3,000,000x1 strip is refused.
The centre square is cut out *before* resizing (`resize(box=...)`), so no intermediate is ever
larger than the decoded image, and the output is always size x size.

Pixel values, whatever the file stores, become 0..255:
- 16-bit files (PNG/TIFF `I;16*`, or a TIFF whose BitsPerSample is 16): value / 65535 * 255;
- 32-bit integer (`I`): as 8-bit if every value is in 0..255, as 16-bit if in 0..65535,
  else the image's own min..max;
- float (`F`): 0..1 if every value is in [0, 1], -1..1 if in [-1, 1], 0..255 if in [0, 255],
  else the image's own min..max; NaN and -inf become black, +inf white;
- transparency (RGBA, LA, PA, palette or RGB/L with a transparent colour) is composited over white,
  as a viewer shows it; CMYK, YCbCr, LAB, HSV, 1-bit and palette images are converted by Pillow;
- the EXIF orientation tag is applied (a phone photo stored on its side comes out upright).
"""
from __future__ import annotations

import contextlib
import io
import os
import stat
import warnings
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import numpy as np

from ..errors import DataError, ImageError, ImageTooLargeError
from ..limits import usable_cpus
from ..util import printable

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
MAX_PIXELS = 64_000_000  # larger images are refused before decoding (decompression bombs)
MAX_ASPECT = 50  # longer side / shorter side; beyond it the centre square is a sliver of the image


def file_kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):
        if test(mode):
            return name
    return "not a plain file"


def walk(folder: Path) -> tuple[list[Path], list[tuple[Path, str]]]:
    """(entries that are not folders, [(path, why it was not searched)]) below `folder`, sorted.

    Hidden names (".*") are skipped; linked folders are never followed (a link to `/` must not make
    a scan walk the whole disk), and are reported; folders that cannot be listed are reported.
    """
    files, skipped = [], []

    def onerror(e: OSError) -> None:
        skipped.append((Path(e.filename), f"cannot list it: {e.strerror}"))

    for top, dirs, names in os.walk(folder, onerror=onerror):  # followlinks=False
        top = Path(top)
        for d in list(dirs):
            if d.startswith(".") or (top / d).is_symlink():
                dirs.remove(d)
                if not d.startswith("."):
                    skipped.append((top / d, "a linked folder (links to folders are not followed)"))
        files += [top / n for n in names if not n.startswith(".")]
    return sorted(files), skipped


def has_split_dirs(root: Path) -> bool:
    return (root / "train").is_dir()


def scan(root: Path, within: Path | None = None) -> tuple[list[Path], list[int], list[str]]:
    """(files, labels, class names) of a `root/<class>/<file>` tree; classes in sorted order.

    A class folder that is a link must point inside `root` (or inside `within`, the dataset folder
    when `root` is its `train/` or `test/`); anything else is refused rather than walked.
    """
    if not root.exists():
        raise DataError(f"{printable(root)} does not exist")
    if not root.is_dir():
        raise DataError(f"{printable(root)} is not a folder; expected {printable(root)}/<class name>/<images>")
    try:
        entries = sorted(root.iterdir())
    except OSError as e:
        raise DataError(f"cannot list {printable(root)}: {e.strerror}") from None
    classes = [d.name for d in entries if not d.name.startswith(".") and d.is_dir()]
    if not classes:
        raise DataError(f"{printable(root)} has no class folders; expected {printable(root)}/<class name>/<images>")
    if len(classes) == 1:
        raise DataError(f"{printable(root)} has a single class folder ({classes[0]!r}); a classifier needs at "
                        f"least two")
    bases = {root.resolve()} | ({within.resolve()} if within is not None else set())
    files, labels, not_searched = [], [], []
    for label, name in enumerate(classes):
        folder = root / name
        real = folder.resolve()
        if not any(real != b and real.is_relative_to(b) for b in bases):
            raise DataError(f"class folder {printable(folder)} links to {printable(real)}, outside "
                            f"{printable(root)}; vitlab does not follow links out of a dataset folder (move or "
                            f"copy those images into it)")
        found, skipped = walk(folder)
        not_searched += skipped
        if not found:
            raise DataError(f"class folder {printable(folder)} is empty" +
                            (f" ({printable(skipped[0][0])}: {skipped[0][1]})" if skipped else ""))
        files += found
        labels += [label] * len(found)
    if not_searched:
        warnings.warn(f"did not search {len(not_searched)} folder(s): " + _listing(not_searched), stacklevel=2)
    return files, labels, classes


def _listing(items: list[tuple[Path, str]], limit: int = 10) -> str:
    return "; ".join(f"{printable(f)} ({why})" for f, why in items[:limit]) + (
        f"; and {len(items) - limit} more" if len(items) > limit else "")


# ---- decoding one file -----------------------------------------------------------------------
_ORIENTATION = {2: "FLIP_LEFT_RIGHT", 3: "ROTATE_180", 4: "FLIP_TOP_BOTTOM", 5: "TRANSPOSE",
                6: "ROTATE_270", 7: "TRANSVERSE", 8: "ROTATE_90"}  # EXIF tag 0x0112 -> Pillow transpose


def _open_regular(path: str):
    """An open binary file, or ImageError. Never blocks (FIFOs) and never opens a device."""
    try:
        st = os.stat(path)  # follows links: what matters is what would be read
    except FileNotFoundError:
        raise ImageError(path, "a broken link" if os.path.islink(path) else "no such file") from None
    except OSError as e:
        raise ImageError(path, e.strerror or str(e)) from None
    if not stat.S_ISREG(st.st_mode):
        raise ImageError(path, f"not a regular file ({file_kind(st.st_mode)})")
    try:  # O_NONBLOCK: if the file was swapped for a FIFO since the stat, opening it still returns
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    except OSError as e:
        raise ImageError(path, e.strerror or str(e)) from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise ImageError(path, f"not a regular file ({file_kind(st.st_mode)})")
    if st.st_size == 0:
        os.close(fd)
        raise ImageError(path, "empty file (0 bytes)")
    return os.fdopen(fd, "rb")


def check_size(path: str, w: int, h: int) -> None:
    """ImageTooLargeError unless a w x h image is within MAX_PIXELS and MAX_ASPECT."""
    if w * h > MAX_PIXELS:
        raise ImageTooLargeError(path, f"image of {w}x{h} = {w * h:,} pixels exceeds the {MAX_PIXELS:,}-pixel "
                                       f"limit")
    if max(w, h) > MAX_ASPECT * min(w, h):
        raise ImageTooLargeError(path, f"image of {w}x{h} has an aspect ratio of {max(w, h) / max(min(w, h), 1):,.0f}:1, "
                                       f"beyond the {MAX_ASPECT}:1 limit (its centre square would be a sliver); "
                                       f"crop it first")


def _value_range(arr: np.ndarray, mode: str, bits: int | None) -> tuple[float, float]:
    """The stored values that map to 0 and 255 (the rules in the module docstring)."""
    if mode.startswith("I;16") or bits == 16:
        return 0.0, 65535.0
    lo = hi = None
    for chunk in _chunks(arr):  # min/max of the finite values without a full-size temporary
        finite = chunk[np.isfinite(chunk)] if arr.dtype.kind == "f" else chunk.ravel()
        if finite.size:
            lo = float(finite.min()) if lo is None else min(lo, float(finite.min()))
            hi = float(finite.max()) if hi is None else max(hi, float(finite.max()))
    if lo is None:  # nothing finite
        return 0.0, 1.0
    ranges = ((0.0, 1.0), (-1.0, 1.0), (0.0, 255.0)) if arr.dtype.kind == "f" else ((0.0, 255.0), (0.0, 65535.0))
    for a, b in ranges:
        if a <= lo and hi <= b:
            return a, b
    return (lo, hi) if hi > lo else (lo, lo + 1.0)


def _chunks(arr: np.ndarray, elements: int = 1 << 20):
    rows = max(1, elements // max(1, arr.shape[1] if arr.ndim > 1 else 1))
    for i in range(0, len(arr), rows):
        yield arr[i:i + rows]


def _high_bit_to_l(im, box: tuple[int, int, int, int], bits: int | None):
    """A 16-bit, 32-bit integer or float image's square `box` -> 8-bit greyscale (Pillow's own
    conversion clips at 255: a 16-bit gradient came out nearly white)."""
    from PIL import Image
    arr = np.asarray(im)
    left, top, right, bottom = box
    square = arr[top:bottom, left:right]  # a view
    lo, hi = _value_range(square, im.mode, bits)
    out = np.empty(square.shape, dtype=np.uint8)
    scale = 255.0 / (hi - lo)
    for src, dst in zip(_chunks(square), _chunks(out)):
        x = src.astype(np.float32)
        if src.dtype.kind == "f":
            np.nan_to_num(x, copy=False, nan=lo, posinf=hi, neginf=lo)
        dst[...] = np.clip(np.rint((x - lo) * scale), 0, 255)
    return Image.fromarray(out, "L")


def _flatten(im, box, bits):
    """(image in L, RGB or CMYK-like mode that resizes correctly, box within it)."""
    mode = im.mode
    if mode.startswith("I") or mode == "F":
        return _high_bit_to_l(im, box, bits), (0, 0, box[2] - box[0], box[3] - box[1])
    if mode in ("1", "P", "PA", "LAB", "HSV") or "transparency" in im.info:
        has_alpha = mode == "PA" or "transparency" in im.info
        im = im.convert("RGBA" if has_alpha else ("L" if mode == "1" else "RGB"))
    return im, box  # RGBA / LA are resized premultiplied by Pillow, then composited


@contextlib.contextmanager
def _open_image(path: str, size: int, data: bytes | None = None):
    """The image at `path` (or in `data`, named `path`; Pillow, lazily decoded), its header checked
    against the limits: a JPEG at the scale it will be decoded at (`draft`: 1/2, 1/4 or 1/8, still
    >= size), others as stored. Raises ImageTooLargeError or ImageError naming the file."""
    from PIL import Image
    if data is not None and not data:
        raise ImageError(path, "empty file (0 bytes)")
    source = _open_regular(path) if data is None else io.BytesIO(data)
    # Pillow's bomb and EXIF warnings are silenced: the limits here decide, in one line. catch_warnings
    # is not thread-safe, so a caller decoding in threads (`vitlab serve`, which passes `data`) installs
    # those filters once instead.
    with source as f, warnings.catch_warnings() if data is None else contextlib.nullcontext():
        if data is None:
            warnings.simplefilter("ignore")
        try:
            im = Image.open(f)
        except Image.DecompressionBombError as e:
            raise ImageTooLargeError(path, str(e)) from None
        except Image.UnidentifiedImageError:
            raise ImageError(path, "not an image file (or not in a format Pillow reads)") from None
        except Exception as e:  # Pillow raises many types for bad files
            raise ImageError(path, f"not a readable image ({type(e).__name__}: {e})") from None
        with im:
            if im.format != "JPEG":  # a JPEG is checked at the scale it will be decoded at
                check_size(path, *im.size)
            try:
                im.draft(None, (size, size))
            except Exception as e:
                raise ImageError(path, f"cannot decode it ({type(e).__name__}: {e})") from None
            check_size(path, *im.size)
            yield im


def probe_image(path: str | os.PathLike, size: int) -> None:
    """decode_image's checks that need only the file's header (regular file, an image Pillow reads,
    within the size limits), without decoding pixels. Raises as decode_image does."""
    with _open_image(os.fspath(path), size):
        pass


def decode_image(path: str | os.PathLike, size: int, channels: int, data: bytes | None = None) -> np.ndarray:
    """One image file -> (channels, size, size) uint8: centre square, resized (see the module docstring).
    With `data`, the file's bytes (an upload), `path` only names it in errors.

    Raises ImageTooLargeError (pixel count or aspect ratio beyond the limits) or ImageError (anything
    else: not a regular file, unreadable, not an image, truncated), both naming the file.
    """
    from PIL import Image
    path = os.fspath(path)
    with _open_image(path, size, data) as im:
        try:
            w, h = im.size
            try:
                orientation = im.getexif().get(0x0112)
            except Exception:  # a damaged EXIF block is not a damaged image
                orientation = None
            bits = getattr(im, "tag_v2", {}).get(258) if im.format == "TIFF" else None
            bits = bits[0] if isinstance(bits, tuple) else bits
            side = min(w, h)
            left, top = (w - side) // 2, (h - side) // 2
            im.load()
            flat, box = _flatten(im, (left, top, left + side, top + side), bits)
            out = flat.resize((size, size), Image.BICUBIC, box=box, reducing_gap=3.0)
            if out.mode in ("RGBA", "LA"):  # over white, as a viewer shows transparency
                out = Image.alpha_composite(Image.new("RGBA", out.size, (255, 255, 255, 255)), out.convert("RGBA"))
            out = out.convert("L" if channels == 1 else "RGB")
            if orientation in _ORIENTATION:
                out = out.transpose(getattr(Image.Transpose, _ORIENTATION[orientation]))
            arr = np.asarray(out, dtype=np.uint8)
        except ImageError:
            raise
        except Exception as e:
            raise ImageError(path, f"cannot decode it ({type(e).__name__}: {e})") from None
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)  # (H, W, C) -> (C, H, W)


def _decode_or_error(args: tuple[str, int, int]) -> np.ndarray | ImageError:
    """A worker's result for decode_image(path, size, channels): the array, or the ImageError as a
    value (one bad file must not stop `pool.map` for the others; ImageError pickles with its path
    and reason)."""
    try:
        return decode_image(*args)
    except ImageError as e:
        return e


def _probe_or_error(args: tuple[str, int, int]) -> None | ImageError:
    """A worker's result for probe_image(path, size): None, or the ImageError as a value."""
    try:
        return probe_image(args[0], args[1])
    except ImageError as e:
        return e


def default_workers() -> int:
    return min(4, usable_cpus())


def _map(fn, files: list[Path], size: int, channels: int, workers: int | None) -> list:
    workers = workers if workers is not None else default_workers()
    jobs = [(str(f), size, channels) for f in files]
    if workers > 1 and len(jobs) > 64:
        try:
            with ProcessPoolExecutor(workers) as pool:
                return list(pool.map(fn, jobs, chunksize=64))
        except BrokenProcessPool:
            raise DataError(f"a process decoding images died (out of memory?) while reading {len(files)} files "
                            f"under {printable(os.path.commonpath([str(f) for f in files]))}") from None
    return [fn(j) for j in jobs]


def usable(results: list, files: list[Path], strict: bool = False, labels: list[int] | None = None,
           classes: list[str] | None = None, root: Path | None = None) -> np.ndarray:
    """The indices of the files whose result is not an ImageError, after the checks: an image beyond
    the size limits is an error; unreadable files are skipped with one warning listing them (an
    error when `strict`); with `labels` and `classes`, a class that had files but none usable is an
    error naming the class and its folder (`root / class`)."""
    too_large = [r for r in results if isinstance(r, ImageTooLargeError)]
    if too_large:
        more = f" ({len(too_large) - 1} more such file(s))" if len(too_large) > 1 else ""
        raise ImageTooLargeError(too_large[0].path, f"{too_large[0].reason}; refusing to decode it: remove it "
                                                    f"from the dataset or shrink it{more}")
    bad = [(i, r) for i, r in enumerate(results) if isinstance(r, ImageError)]
    listing = _listing([(files[i], r.reason) for i, r in bad])
    if bad and strict:
        raise DataError(f"{len(bad)} unreadable file(s): {listing}")
    keep = np.array([i for i, r in enumerate(results) if not isinstance(r, ImageError)], dtype=np.int64)
    if keep.size == 0:
        raise DataError(f"none of the {len(files)} files could be read as images: {listing}")
    if labels is not None and classes is not None:
        labels_arr = np.asarray(labels)
        kept = np.bincount(labels_arr[keep], minlength=len(classes))
        for c in np.flatnonzero((np.bincount(labels_arr, minlength=len(classes)) > 0) & (kept == 0)):
            first = next(r for i, r in bad if labels_arr[i] == c)
            folder = root / classes[c] if root is not None else Path(first.path).parent
            n = int((labels_arr == c).sum())
            raise DataError(f"class {classes[c]!r} ({printable(folder)}) has no usable image: none of its {n} "
                            f"file(s) could be read (e.g. {first}); fix or remove them, or remove the class folder")
    if bad:
        warnings.warn(f"skipped {len(bad)} unreadable file(s): {listing}", stacklevel=3)
    return keep


def decode_files(files: list[Path], size: int, channels: int, strict: bool = False, workers: int | None = None,
                 labels: list[int] | None = None, classes: list[str] | None = None,
                 root: Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(N, C, size, size) uint8 for the usable files (see `usable`), and the indices of those files."""
    results = _map(_decode_or_error, files, size, channels, workers)
    keep = usable(results, files, strict, labels, classes, root)
    return np.stack([results[i] for i in keep]), keep


def probe_files(files: list[Path], size: int, strict: bool = False, workers: int | None = None,
                labels: list[int] | None = None, classes: list[str] | None = None,
                root: Path | None = None) -> np.ndarray:
    """The indices of the usable files (see `usable`), from their headers alone: what a streamed
    folder is checked with before training (a file damaged past its header shows when it is decoded)."""
    return usable(_map(_probe_or_error, files, size, 1, workers), files, strict, labels, classes, root)
