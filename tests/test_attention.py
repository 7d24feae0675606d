"""Chapter 06: attention from the formulas equals diffusers' and transformers' modules at SD1.5's
dimensions, with and without LoRA on its projections."""

from __future__ import annotations

import pytest
import torch
from diffusers.models.attention_processor import Attention
from transformers import CLIPTextConfig
from transformers.models.clip.modeling_clip import CLIPAttention

from lokr_edu.adapters import inject, set_strength
from lokr_edu.attention import (
    attention_weights,
    causal_mask,
    clip_attention,
    effective_weight,
    merge_heads,
    split_heads,
    unet_attention,
)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def sd_attention(d_model: int, cross: bool) -> Attention:
    """An SD1.5 U-Net attention block: 8 heads, no q/k/v bias, text context of width 768."""
    torch.manual_seed(d_model + cross)
    return Attention(
        query_dim=d_model,
        cross_attention_dim=768 if cross else None,
        heads=8,
        dim_head=d_model // 8,
        bias=False,
        out_bias=True,
    ).eval()


def sd_clip_attention() -> CLIPAttention:
    torch.manual_seed(0)
    config = CLIPTextConfig(hidden_size=768, num_attention_heads=12, intermediate_size=3072)
    config._attn_implementation = "eager"
    return CLIPAttention(config).eval()


def randomize_adapters(model: torch.nn.Module) -> None:
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(std=0.05)


def test_heads_split_and_merge_back() -> None:
    x = torch.randn(2, 5, 12)
    heads = split_heads(x, 3)
    assert heads.shape == (2, 3, 5, 4)
    assert torch.equal(heads[:, 1], x[..., 4:8])  # head 1 is features 4..7
    assert torch.equal(merge_heads(heads), x)
    with pytest.raises(ValueError, match="heads must divide d_model = 12"):
        split_heads(x, 5)


def test_attention_rows_are_distributions_and_the_mask_is_causal() -> None:
    q, k = torch.randn(1, 2, 6, 4), torch.randn(1, 2, 6, 4)
    weights = attention_weights(q, k, causal_mask(6))
    assert torch.allclose(weights.sum(-1), torch.ones(1, 2, 6))
    assert torch.count_nonzero(torch.triu(weights, diagonal=1)) == 0


@pytest.mark.parametrize("d_model", [320, 640, 1280])
@pytest.mark.parametrize("cross", [False, True], ids=["self", "cross"])
def test_unet_attention_matches_diffusers(d_model: int, cross: bool) -> None:
    module = sd_attention(d_model, cross)
    x = torch.randn(2, 64, d_model)
    context = torch.randn(2, 77, 768) if cross else None
    with torch.no_grad():
        assert (
            relative_error(
                unet_attention(module, x, context), module(x, encoder_hidden_states=context)
            )
            <= 1e-5
        )


def test_clip_attention_matches_transformers() -> None:
    module = sd_clip_attention()
    x = torch.randn(2, 77, 768)
    with torch.no_grad():
        reference = module(x, attention_mask=causal_mask(77)[None, None])[0]
        assert relative_error(clip_attention(module, x), reference) <= 1e-5


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0, -1.0])
def test_lora_on_all_four_projections_matches_the_wrapped_modules(eta: float) -> None:
    unet_block = sd_attention(320, cross=True)
    inject(unet_block, ["to_q", "to_k", "to_v", "to_out.0"], "lora", rank=4)
    clip_block = sd_clip_attention()
    inject(clip_block, ["q_proj", "k_proj", "v_proj", "out_proj"], "lora", rank=4)
    for model in (unet_block, clip_block):
        randomize_adapters(model)
        set_strength(model, eta)
    x, context, text = torch.randn(2, 64, 320), torch.randn(2, 77, 768), torch.randn(2, 77, 768)
    with torch.no_grad():
        unet_reference = unet_block(x, encoder_hidden_states=context)
        clip_reference = clip_block(text, attention_mask=causal_mask(77)[None, None])[0]
        assert relative_error(unet_attention(unet_block, x, context), unet_reference) <= 1e-5
        assert relative_error(clip_attention(clip_block, text), clip_reference) <= 1e-5


def test_effective_weight_is_w_plus_eta_delta() -> None:
    block = sd_attention(320, cross=False)
    W = block.to_q.weight.detach().clone()
    inject(block, "to_q", "lokr", rank=4)
    randomize_adapters(block)
    set_strength(block, 0.3)
    W_tilde, bias = effective_weight(block.to_q)
    assert bias is None
    assert torch.allclose(W_tilde, W + 0.3 * block.to_q.adapters["default"].delta_weight())
    with pytest.raises(ValueError, match="layer must be nn.Linear or an AdapterLayer"):
        effective_weight(torch.nn.Conv2d(2, 2, 1))
