"""Export a vitlab model for deployment: ONNX or TorchScript, with a JSON sidecar.

The model file gets a sidecar `FILE.json` that holds what a runtime needs besides the graph: the
input (name, NCHW shape, dtype, and that pixels arrive normalised), the preprocessing (image size,
channels, mean, std), the class names, the model config, and the parity measured at export time.

ONNX export goes through `torch.onnx.export`. The model is switched to the explicit attention
kernel (matmul + softmax) for the export, since every ONNX opset and runtime has those ops. The graph
is checked with `onnx.checker`, then run through onnxruntime on the same inputs as eager PyTorch.
An fp32 export whose logits differ by more than `tol` (1e-4 by default) is refused.
`int8=True` adds dynamic quantisation of the MatMuls (the linear layers, ~all of a ViT's weights):
int8 weights, activations quantised per batch at run time (onnxruntime.quantization.quantize_dynamic).
The convolutions (patch projection, conv stem) stay fp32: onnxruntime's CPU provider long had no
ConvInteger kernel. Its logits differ more, so the sidecar records the difference and the top-1
agreement with fp32 instead of enforcing a bound.

Nothing is written over an existing file: the files are written under temporary names in the target
folder and published with os.link (which fails rather than replace anything) once the checks pass,
so a failed export leaves no files behind. The caller's model is not changed (a CPU fp32 copy is
exported).
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import ViTConfig
from ..errors import ConfigError, ModelFileError, VitlabError
from ..limits import affinity_cpus, usable_cpus
from ..model import VisionTransformer

FORMATS = ("onnx", "torchscript")
SUFFIXES = {"onnx": ".onnx", "torchscript": ".pt"}
INPUT_NAME, OUTPUT_NAME = "pixels", "logits"
MIN_OPSET = 14  # the oldest opset the tests run (LayerNorm is decomposed below 17)
MAX_TORCH_OPSET = 20  # torch's TorchScript-based exporter (used here) writes opsets up to 20
DEFAULT_OPSET = 17
FP32_TOL = 1e-4
PARITY_BATCHES = (1, 32)  # a dynamic-batch export is compared at both; a fixed one image by image
PARITY_IMAGES = 32  # images `vitlab export --images` reads for the parity check


class ExportError(VitlabError, RuntimeError):
    """An export that cannot be done here or failed its checks (names the setting and the numbers)."""


def _need(module: str, extra: str = "onnx"):
    try:
        return __import__(module, fromlist=["_"])
    except ImportError:
        raise ExportError(f"ONNX models need the `{module}` package: pip install 'vitlab[{extra}]'") from None


def _first_line(e: BaseException) -> str:
    """An exception's first line, for one-line messages (some exporter errors have none)."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:300]


def sidecar_path(file: str | os.PathLike) -> Path:
    return Path(str(file) + ".json")


def default_output(model_dir: Path, fmt: str, int8: bool) -> Path:
    """MODEL_DIR/model.onnx, model.int8.onnx or model.torchscript.pt."""
    name = {"onnx": "model.int8.onnx" if int8 else "model.onnx", "torchscript": "model.torchscript.pt"}[fmt]
    return model_dir / name


def check_settings(fmt: str, opset: int, int8: bool, out: Path) -> None:
    """Every export setting, before anything is computed or written."""
    if fmt not in FORMATS:
        raise ConfigError(f"--format {fmt!r} must be one of {FORMATS}")
    if int8 and fmt != "onnx":
        raise ConfigError(f"--int8 is dynamic quantisation of an ONNX graph; --format {fmt} has none")
    if fmt == "onnx":
        onnx = _need("onnx")
        newest = min(onnx.defs.onnx_opset_version(), MAX_TORCH_OPSET)
        if not MIN_OPSET <= opset <= newest:
            raise ConfigError(f"--opset {opset} must be in [{MIN_OPSET}, {newest}] (torch's exporter writes up to "
                              f"{MAX_TORCH_OPSET}, onnx {onnx.__version__} knows up to "
                              f"{onnx.defs.onnx_opset_version()})")
    if out.suffix != SUFFIXES[fmt]:
        raise ConfigError(f"--out {out} should end in {SUFFIXES[fmt]} for --format {fmt}")
    for f in (out, sidecar_path(out)):
        if f.exists() or f.is_symlink():
            raise ModelFileError(f"{f} exists; vitlab export never writes over a file (choose another --out)")
    if not out.parent.is_dir():
        raise ModelFileError(f"--out {out}: folder {out.parent} does not exist")


def sample_inputs(cfg: ViTConfig, batch: int, seed: int = 0) -> torch.Tensor:
    """Normalised-looking inputs (standard normal), the same for every call with the same seed."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, cfg.in_chans, cfg.img_size, cfg.img_size, generator=g)


def ort_session(path: str | os.PathLike, threads: int | None = None):
    """An onnxruntime CPU session for `path` (one clear error where onnxruntime cannot run it)."""
    ort = _need("onnxruntime")
    opts = ort.SessionOptions()
    usable = usable_cpus()
    if not threads and usable < affinity_cpus():  # a container's CPU quota: onnxruntime would not see it
        threads = min(usable, torch.get_num_threads())  # nor more than one per physical core, its default
    if threads:
        opts.intra_op_num_threads = threads
    try:
        return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own exception types, not importable portably
        raise ExportError(f"onnxruntime {ort.__version__} cannot run {path}: {_first_line(e)}") from None


def compare(reference: Callable[[torch.Tensor], torch.Tensor], candidate: Callable[[np.ndarray], np.ndarray],
            inputs: list[torch.Tensor]) -> dict[str, Any]:
    """Per batch size ("batch1", "batch32"): the largest |Δlogits| of `candidate` against `reference`,
    its top-1 agreement and the number of images, over every batch of that size in `inputs`."""
    worst: dict[str, float] = {}
    agree: dict[str, list[bool]] = {}
    for x in inputs:
        with torch.no_grad():
            ref = reference(x).float().numpy()
            try:
                got = np.asarray(candidate(x.numpy()))
            except Exception as e:  # the runtime's own errors (a graph it cannot run on these inputs)
                raise ExportError(f"the exported model failed on a batch of {len(x)}: {_first_line(e)}") from None
        key = f"batch{len(x)}"
        worst[key] = max(worst.get(key, 0.0), float(np.abs(ref - got).max()))
        agree.setdefault(key, []).extend((ref.argmax(-1) == got.argmax(-1)).tolist())
    return {k: {"max_abs_diff": worst[k], "top1_agreement": float(np.mean(agree[k])), "images": len(agree[k])}
            for k in worst}


def parity_batches(cfg: ViTConfig, dynamic_batch: bool, inputs: torch.Tensor | None) -> list[torch.Tensor]:
    """What parity is measured on: batch 1 and batch 32 (or all of `inputs`, if fewer) for a
    dynamic-batch export; each image alone, up to 32, for a fixed batch-1 export. Without `inputs`,
    seeded standard-normal images."""
    if inputs is None or len(inputs) < (2 if dynamic_batch else 1):
        inputs = sample_inputs(cfg, PARITY_IMAGES)
    inputs = inputs[:PARITY_IMAGES].float()
    if dynamic_batch:
        return [inputs[:1], inputs]
    return [inputs[i:i + 1] for i in range(len(inputs))]


@contextlib.contextmanager
def _quiet():
    """The exporters' tracer and deprecation warnings are about torch internals, not the user's model."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        yield


def _within(parity: dict[str, Any], tol: float, what: str) -> dict[str, Any]:
    """`parity` (from compare) if its largest difference is at most `tol`, else an ExportError."""
    worst = max(p["max_abs_diff"] for p in parity.values())
    if not worst <= tol:
        raise ExportError(f"{what}'s logits differ from PyTorch's by {worst:.3g} > {tol:g} "
                          f"(per batch size: {parity}); nothing was written")
    return parity


def _export_onnx(model: VisionTransformer, tmp: Path, opset: int, dynamic_batch: bool) -> None:
    x = sample_inputs(model.config, 1)
    kwargs: dict[str, Any] = {"input_names": [INPUT_NAME], "output_names": [OUTPUT_NAME], "opset_version": opset}
    if dynamic_batch:
        kwargs["dynamic_axes"] = {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}}
    try:  # the TorchScript-based exporter: dynamic_axes and every opset from 14 on, no onnxscript needed
        with _quiet():
            torch.onnx.export(model, (x,), str(tmp), dynamo=False, **kwargs)
    except Exception as e:  # the exporter's own errors: name what failed, keep it one line
        raise ExportError(f"torch.onnx.export failed at opset {opset}: {_first_line(e)}") from None
    onnx = _need("onnx")
    try:
        onnx.checker.check_model(str(tmp), full_check=True)
    except Exception as e:
        raise ExportError(f"the exported graph fails onnx.checker: {_first_line(e)}") from None


def _export_torchscript(model: VisionTransformer, tmp: Path) -> None:
    x = sample_inputs(model.config, 1)
    try:
        with _quiet(), torch.no_grad():
            traced = torch.jit.trace(model, (x,), check_trace=False)
        traced.save(str(tmp))
    except Exception as e:
        raise ExportError(f"TorchScript tracing failed: {_first_line(e)}") from None


def _quantize(src: Path, dst: Path) -> None:
    quantization = _need("onnxruntime.quantization")
    onnx = _need("onnx")
    import logging
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)  # its advice to pre-process the graph first, on the root logger
    try:  # a ModelProto, not a path: its shape-inference file then goes to the system temp folder
        quantization.quantize_dynamic(onnx.load(str(src)), str(dst), weight_type=quantization.QuantType.QInt8,
                                      op_types_to_quantize=["MatMul"])
    except Exception as e:
        raise ExportError(f"int8 quantisation failed: {_first_line(e)}") from None
    finally:
        logging.disable(previous)


def _publish(tmp: Path, final: Path) -> None:
    """tmp -> final without ever replacing a file: a hard link fails if `final` appeared meanwhile."""
    try:
        os.link(tmp, final)
    except FileExistsError:
        raise ModelFileError(f"{final} appeared during the export; vitlab export never writes over a file") from None
    except OSError:  # a file system without hard links: the same check, a small race window
        if final.exists() or final.is_symlink():
            raise ModelFileError(f"{final} exists; vitlab export never writes over a file") from None
        os.replace(tmp, final)
        return
    tmp.unlink()


def export_model(model: VisionTransformer, out: str | os.PathLike, fmt: str = "onnx", dynamic_batch: bool = False,
                 opset: int = DEFAULT_OPSET, int8: bool = False, inputs: torch.Tensor | None = None,
                 tol: float = FP32_TOL, source: str | None = None) -> dict[str, Any]:
    """Write `model` to `out` (+ `out`.json) and return the sidecar record.

    `inputs` (normalised images, N >= 1) are what parity is measured on (see parity_batches);
    without them, seeded random inputs. Real images are the better test: the test suite and
    `vitlab export --images` use them."""
    out = Path(out)
    check_settings(fmt, opset, int8, out)
    cfg = model.config
    model = copy.deepcopy(model).cpu().float().eval()  # the caller's model keeps its device, dtype and mode
    model.set_attn_impl("math")
    checks = parity_batches(cfg, dynamic_batch, inputs)
    tmps: list[Path] = []
    published: list[Path] = []

    def tmp_name(suffix: str) -> Path:
        fd, name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=suffix, dir=out.parent)
        os.close(fd)
        tmps.append(Path(name))
        return Path(name)

    try:
        t = time.perf_counter()
        model_tmp = tmp_name(SUFFIXES[fmt])
        record: dict[str, Any] = {"format": fmt, "file": out.name, "int8": int8, "dynamic_batch": dynamic_batch}
        if fmt == "onnx":
            _export_onnx(model, model_tmp, opset, dynamic_batch)
            session = ort_session(model_tmp)
            parity = compare(model, lambda a: session.run([OUTPUT_NAME], {INPUT_NAME: a})[0], checks)
            record.update(opset=opset, parity_fp32=_within(parity, tol, "onnxruntime"))
            if int8:
                q_tmp = tmp_name(".onnx")
                _quantize(model_tmp, q_tmp)
                q_session = ort_session(q_tmp)
                record["parity_int8"] = compare(model, lambda a: q_session.run([OUTPUT_NAME], {INPUT_NAME: a})[0],
                                                checks)
                record["fp32_bytes"] = model_tmp.stat().st_size
                model_tmp = q_tmp
        else:
            _export_torchscript(model, model_tmp)
            with _quiet():
                loaded = torch.jit.load(str(model_tmp))
            parity = compare(model, lambda a: loaded(torch.from_numpy(a)).numpy(), checks)
            record["parity_fp32"] = _within(parity, tol, "the TorchScript module")
        import vitlab
        batch = "batch" if dynamic_batch else 1
        record.update({
            "bytes": model_tmp.stat().st_size, "export_s": round(time.perf_counter() - t, 2),
            "input": {"name": INPUT_NAME, "shape": [batch, cfg.in_chans, cfg.img_size, cfg.img_size],
                      "dtype": "float32",
                      "meaning": "the image's centre square, resized to img_size, as pixels in [0, 1] "
                                 "(grey or RGB as `channels` says), then (x - mean) / std per channel"},
            "output": {"name": OUTPUT_NAME, "shape": [batch, cfg.num_classes], "meaning": "logits"},
            "preprocessing": {"img_size": cfg.img_size, "channels": cfg.in_chans, "mean": list(cfg.mean),
                              "std": list(cfg.std)},
            "class_names": list(cfg.class_names) if cfg.class_names else None,
            "config": cfg.to_dict(), "source": source,
            "versions": {"vitlab": vitlab.__version__, "torch": torch.__version__, **_versions(fmt)},
        })
        side_tmp = tmp_name(".json")
        side_tmp.write_text(json.dumps(record, indent=2) + "\n")
        mode = 0o666 & ~_umask()
        for f in (model_tmp, side_tmp):
            os.chmod(f, mode)  # mkstemp makes 0600 files; exports are for sharing
        # The model first: a sidecar only ever sits beside a finished model file.
        _publish(model_tmp, out)
        published.append(out)
        _publish(side_tmp, sidecar_path(out))
        published.append(sidecar_path(out))
        return record
    except BaseException:
        if len(published) == 1:
            out.unlink(missing_ok=True)  # ours, published, but its sidecar failed: no half export
        raise
    finally:
        for f in tmps:
            f.unlink(missing_ok=True)


def _umask() -> int:
    """The process umask, read without changing it where Linux tells it (else set and put back)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _versions(fmt: str) -> dict[str, str]:
    if fmt != "onnx":
        return {}
    import onnx
    import onnxruntime
    return {"onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}


class OnnxModel:
    """An exported ONNX model behind the interface `vitlab predict` uses: `.config` (rebuilt from
    the sidecar) and a call on a normalised float batch that returns logits as a torch tensor."""

    def __init__(self, path: str | os.PathLike, threads: int | None = None):
        path = Path(path)
        if not path.is_file():
            raise ModelFileError(f"{path}: no such ONNX file")
        side = sidecar_path(path)
        if not side.is_file():
            raise ModelFileError(f"{path}: no sidecar {side.name} beside it (vitlab export writes both)")
        try:
            record = json.loads(side.read_text())
            self.config = ViTConfig.from_dict(record["config"])
        except (ValueError, KeyError, TypeError, ConfigError, RecursionError) as e:
            raise ModelFileError(f"{side} is not a vitlab export sidecar ({str(e)[:200]})") from None
        self.path, self.record = path, record
        self.dynamic_batch = bool(record.get("dynamic_batch"))
        self.session = ort_session(path, threads)

    def _run(self, a: np.ndarray) -> np.ndarray:
        try:
            return self.session.run([OUTPUT_NAME], {INPUT_NAME: a})[0]
        except Exception as e:  # a sidecar that does not describe this graph
            raise ModelFileError(f"{self.path} cannot run a batch of shape {list(a.shape)} as its sidecar "
                                 f"describes: {_first_line(e)}") from None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        a = x.float().contiguous().numpy()
        if self.dynamic_batch:
            return torch.from_numpy(self._run(a))
        # a fixed-batch graph (batch 1) takes one image at a time
        return torch.from_numpy(np.concatenate([self._run(a[i:i + 1]) for i in range(len(a))]))


def cached_onnx(model_dir: str | os.PathLike, model: VisionTransformer, log=None) -> Path:
    """An ONNX export (fp32, any batch size, parity-checked) of a model directory, made on first use
    and kept under the cache (util.cache_root()/onnx), keyed by the directory's files (resolved path,
    size, modification time) and the exporter's versions: `vitlab predict`'s fastest backend
    without an explicit `vitlab export`. ExportError when the model cannot be exported."""
    from ..util import cache_root
    import onnxruntime
    h = hashlib.sha256(f"{DEFAULT_OPSET}|{torch.__version__}|{onnxruntime.__version__}".encode())
    for name in ("config.json", "model.safetensors"):
        f = Path(model_dir) / name
        st = f.stat()
        h.update(f"|{f.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode("utf-8", "surrogateescape"))
    folder = cache_root() / "onnx"
    path = folder / f"{h.hexdigest()[:32]}.onnx"
    if path.is_file() and sidecar_path(path).is_file():
        return path
    folder.mkdir(parents=True, exist_ok=True)
    if log is not None:
        log(f"exporting {model_dir} for onnxruntime, once (kept as {path})")
    try:
        export_model(model, path, "onnx", dynamic_batch=True, source=str(model_dir))
    except ExportError:
        if not (path.is_file() and sidecar_path(path).is_file()):  # not another process's export, just made
            raise
    return path


__all__ = ["export_model", "cached_onnx", "ExportError", "OnnxModel", "FORMATS", "sidecar_path", "default_output", "ort_session",
           "PARITY_IMAGES"]
