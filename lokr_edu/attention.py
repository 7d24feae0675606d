"""Attention written from its formulas, as SD1.5's U-Net and CLIP text encoder compute it.

Defined in chapter 06 (notebooks/06_attention_and_lora.ipynb).

For queries from X (tokens × d_model) and keys/values from a context C (self-attention: C = X;
cross-attention in the U-Net: C is the text encoder's output, 77 × 768):

    Q = X·W_qᵀ + b_q    K = C·W_kᵀ + b_k    V = C·W_vᵀ + b_v          (tokens × d_model)
    split the last dimension into h heads of d = d_model / h
    head_i = softmax(Q_i·K_iᵀ / √d + M) · V_i                          (M: 0, or −∞ above the
    out = concat(head_1, …, head_h)·W_oᵀ + b_o                          diagonal for CLIP's mask)

The U-Net's `Attention` has no q/k/v biases and calls W_o `to_out.0`; CLIP's has all four biases.
A LoRA on W_q (or any of them) replaces W by W̃ = W + η·ΔW: `effective_weight` reads W̃ off a
wrapped layer, so the formulas apply unchanged to an adapted model.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from lokr_edu.adapters import AdapterLayer

__all__ = [
    "split_heads",
    "merge_heads",
    "attention_weights",
    "multi_head_attention",
    "causal_mask",
    "effective_weight",
    "unet_attention",
    "clip_attention",
    "part_of",
    "adapter_params_by_part",
]


def split_heads(x: Tensor, heads: int) -> Tensor:
    """(batch, tokens, d_model) -> (batch, heads, tokens, d_model / heads)."""
    batch, tokens, d_model = x.shape
    if heads < 1 or d_model % heads:
        raise ValueError(f"heads must divide d_model = {d_model}, got heads = {heads}")
    return x.reshape(batch, tokens, heads, d_model // heads).transpose(1, 2)


def merge_heads(x: Tensor) -> Tensor:
    """(batch, heads, tokens, d) -> (batch, tokens, heads·d): the concatenation of the heads."""
    batch, heads, tokens, d = x.shape
    return x.transpose(1, 2).reshape(batch, tokens, heads * d)


def causal_mask(tokens: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """(tokens, tokens) additive mask: 0 on and below the diagonal, −∞ above (token t sees ≤ t)."""
    mask = torch.full((tokens, tokens), float("-inf"), dtype=dtype)
    return torch.triu(mask, diagonal=1)


def attention_weights(q: Tensor, k: Tensor, mask: Tensor | None = None) -> Tensor:
    """softmax(Q·Kᵀ/√d + M) over the keys: (batch, heads, q_tokens, k_tokens), rows sum to 1."""
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])  # (B, h, Tq, d)(B, h, d, Tk)
    if mask is not None:
        scores = scores + mask
    return scores.softmax(dim=-1)


def multi_head_attention(
    x: Tensor,
    context: Tensor | None,
    weights: dict[str, Tensor | None],
    heads: int,
    mask: Tensor | None = None,
) -> Tensor:
    """The formula of the module docstring. `weights` holds W_q, W_k, W_v, W_o (d_model-sized
    matrices) and optional biases b_q, b_k, b_v, b_o; context None is self-attention."""
    context = x if context is None else context

    def project(inputs: Tensor, name: str) -> Tensor:
        return nn.functional.linear(inputs, weights[f"W_{name}"], weights.get(f"b_{name}"))

    q = split_heads(project(x, "q"), heads)  # (B, h, Tq, d)
    k = split_heads(project(context, "k"), heads)  # (B, h, Tk, d)
    v = split_heads(project(context, "v"), heads)  # (B, h, Tk, d)
    out = merge_heads(attention_weights(q, k, mask) @ v)  # (B, h, Tq, d) -> (B, Tq, h·d)
    return project(out, "o")


def effective_weight(layer: nn.Module) -> tuple[Tensor, Tensor | None]:
    """(W̃, b) of an nn.Linear, or of a wrapped one: W + Σ η_i·ΔW_i over its active adapters."""
    if isinstance(layer, AdapterLayer):
        W = layer.base.weight
        for name, adapter in layer.adapters.items():
            if layer.enabled[name] and name not in layer.merged:
                W = W + layer.strength[name] * adapter.delta_weight()
        return W, layer.base.bias
    if isinstance(layer, nn.Linear):
        return layer.weight, layer.bias
    raise ValueError(f"layer must be nn.Linear or an AdapterLayer, got {type(layer).__name__}")


def _weights(projections: dict[str, nn.Module]) -> dict[str, Tensor | None]:
    weights: dict[str, Tensor | None] = {}
    for name, layer in projections.items():
        weights[f"W_{name}"], weights[f"b_{name}"] = effective_weight(layer)
    return weights


def unet_attention(module: nn.Module, x: Tensor, context: Tensor | None = None) -> Tensor:
    """diffusers' `Attention` of SD1.5's U-Net (attn1: self, attn2: cross), from the formulas."""
    projections = {"q": module.to_q, "k": module.to_k, "v": module.to_v, "o": module.to_out[0]}
    return multi_head_attention(x, context, _weights(projections), module.heads)


def clip_attention(module: nn.Module, x: Tensor, causal: bool = True) -> Tensor:
    """transformers' `CLIPAttention` with CLIP's causal mask, from the formulas."""
    projections = {"q": module.q_proj, "k": module.k_proj, "v": module.v_proj, "o": module.out_proj}
    mask = causal_mask(x.shape[1], x.dtype) if causal else None
    return multi_head_attention(x, None, _weights(projections), module.num_heads, mask)


# which part of SD1.5 a target layer belongs to, read off its module name
PARTS = {
    "unet": [
        ("attn1.", "U-Net self-attention (q, k, v, out)"),
        ("attn2.to_k", "U-Net cross-attention k, v (read the text)"),
        ("attn2.to_v", "U-Net cross-attention k, v (read the text)"),
        ("attn2.", "U-Net cross-attention q, out (image side)"),
        (".ff.", "U-Net feed-forward (GEGLU)"),
        ("proj_", "U-Net proj_in / proj_out"),
    ],
    "text_encoder": [("self_attn.", "text self-attention"), ("mlp.", "text MLP")],
}


def part_of(name: str, component: str) -> str:
    """The part of the network a target layer of SD1.5 sits in (chapter 06's table)."""
    for marker, part in PARTS[component]:
        if marker in name:
            return part
    raise ValueError(f"name: {name!r} is in none of the parts of the {component}")


def adapter_params_by_part(
    target_set: str = "kohya", method: str = "lora", rank: int = 4
) -> dict[str, int]:
    """Trainable adapter numbers per part of SD1.5 (U-Net and text encoder) for a target set.

    Counts with `lowrank.count_params` over `sd15.targets`, so totals agree with chapter 03.
    """
    from lokr_edu.lowrank import count_params
    from lokr_edu.sd15 import targets

    totals: dict[str, int] = {}
    for component in ("unet", "text_encoder"):
        for t in targets(component, target_set):
            kernel = 1 if t.kind == "conv1x1" else None
            n = count_params(method, t.out_features, t.in_features, rank, kernel_size=kernel)
            part = part_of(t.name, component)
            totals[part] = totals.get(part, 0) + n
    return totals
