"""Looking inside: every layer's attention probabilities, and attention rollout (Abnar & Zuidema,
"Quantifying Attention Flow in Transformers", arXiv 2005.00928).

Capture works through forward hooks on each block's `attn.probe`; a hooked layer takes the explicit
matmul-softmax-matmul kernel over the same weights, so the fast kernel needs no changes and
nothing is stored on the model.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from .model import VisionTransformer
from .util import unwrap_model


@contextmanager
def capture_attention(model: VisionTransformer) -> Iterator[list[torch.Tensor]]:
    """Within the block, each forward appends one (B, heads, N, N) tensor per layer, in order,
    to the yielded list (detached, fp32). The hooks are removed on exit.

        with capture_attention(model) as maps:
            model(x)
        rollout = attention_rollout(maps)
    """
    model = unwrap_model(model)
    maps: list[torch.Tensor] = []
    handles = [block.attn.probe.register_forward_hook(lambda mod, inp, out: maps.append(out.detach().float()))
               for block in model.blocks]
    try:
        yield maps
    finally:
        for handle in handles:
            handle.remove()


def attention_rollout(maps: list[torch.Tensor], residual: float = 0.5) -> torch.Tensor:
    """(B, N, N) rollout: head-averaged attention, mixed with the identity for the residual path,
    row-normalised, multiplied through the layers. Row 0 (class token) is what the head reads."""
    if not maps:
        raise ValueError("no attention maps: run a forward pass inside capture_attention() first")
    B, _, N, _ = maps[0].shape
    eye = torch.eye(N).expand(B, N, N)
    result = eye
    for attn in maps:
        a = residual * attn.mean(dim=1) + (1 - residual) * eye  # (B, H, N, N) -> (B, N, N)
        a = a / a.sum(dim=-1, keepdim=True)
        result = a @ result
    return result
