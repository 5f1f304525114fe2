"""Renaming state dicts between layouts with tables of key templates ("blocks.{i}.norm1.weight")."""
from __future__ import annotations

import re

import torch

from ..errors import ConversionError


def _compile(template: str) -> re.Pattern:
    return re.compile("^" + re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)") + "$")


def rename(state: dict[str, torch.Tensor], table: list[tuple[str, str]], source: str,
           reverse: bool = False) -> dict[str, torch.Tensor]:
    """Rename every key of `state` by `table` of (ours, theirs) templates; theirs -> ours unless
    `reverse`. A key no template matches is an error naming it: nothing is dropped silently."""
    pairs = [(theirs, ours) if not reverse else (ours, theirs) for ours, theirs in table]
    patterns = [(_compile(src), dst) for src, dst in pairs]
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in state.items():
        for pattern, dst in patterns:
            m = pattern.match(key)
            if m:
                out[dst.replace("{i}", m.group("i")) if "{i}" in dst else dst] = value
                break
        else:
            unknown.append(key)
    if unknown:
        raise ConversionError(f"{source}: {len(unknown)} key(s) have no mapping, e.g. {unknown[:4]}")
    return out


def block_count(state: dict[str, torch.Tensor], prefix: str = "blocks.") -> int:
    """Number of transformer blocks in a timm-named state dict."""
    ids = {int(m.group(1)) for k in state if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))}
    if ids != set(range(len(ids))):
        raise ConversionError(f"block indices are not contiguous: {sorted(ids)}")
    return len(ids)
