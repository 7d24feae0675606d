"""Chapter 06's checks pass on the reference answers and explain plausible wrong ones."""

from __future__ import annotations

import math

import pytest
import torch
from check_cases import check_tests

from lokr_edu import checks
from lokr_edu.adapters import set_strength
from lokr_edu.attention import (
    adapter_params_by_part,
    causal_mask,
    merge_heads,
    multi_head_attention,
    split_heads,
)
from lokr_edu.checks.ch06 import TEXT_READING, other_prompt, to_k_adapter
from lokr_edu.lowrank import count_params


def attention(x, context, W_q, W_k, W_v, W_o, b_o, heads, scale=True, split=True, whole=False):
    h = heads if split else 1
    q, k, v = (split_heads(t, h) for t in (x @ W_q.T, context @ W_k.T, context @ W_v.T))
    d = x.shape[-1] if whole else q.shape[-1]  # whole: the mistake of scaling by √d_model
    scores = q @ k.transpose(-1, -2) / (math.sqrt(d) if scale else 1.0)
    out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(x.shape[0], x.shape[1], -1)
    return out @ W_o.T + b_o


def reference_attention(x, context, W_q, W_k, W_v, W_o, b_o, heads):
    weights = {"W_q": W_q, "W_k": W_k, "W_v": W_v, "W_o": W_o, "b_o": b_o}
    return multi_head_attention(x, context, weights, heads)


def softmax_over(dim):
    """Multi-head attention with the softmax of the (B, h, Tq, Tk) scores over axis `dim`."""

    def attention(x, context, W_q, W_k, W_v, W_o, b_o, heads):
        q, k, v = (split_heads(t, heads) for t in (x @ W_q.T, context @ W_k.T, context @ W_v.T))
        weights = (q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])).softmax(dim)
        return merge_heads(weights @ v) @ W_o.T + b_o

    attention.__name__ = f"softmax_over_dim_{dim}"
    return attention


def mask_filled_with(value):
    """A causal mask with `value` instead of −inf above the diagonal."""

    def mask(tokens, dtype=torch.float32):
        return torch.triu(torch.full((tokens, tokens), value, dtype=dtype), diagonal=1)

    mask.__name__ = f"mask_filled_with_{value:g}"
    return mask


def causal_weights(q, k, diagonal=1, after=False, nan_to_zero=False, scale=True):
    t = q.shape[-2]
    scores = q @ k.transpose(-1, -2) / (math.sqrt(q.shape[-1]) if scale else 1.0)
    if after:  # mask the weights after the softmax
        return scores.softmax(-1) * torch.tril(torch.ones(t, t, dtype=q.dtype))
    mask = torch.triu(torch.full((t, t), float("-inf"), dtype=q.dtype), diagonal=diagonal)
    weights = (scores + mask).softmax(-1)
    return weights.nan_to_num(0.0) if nan_to_zero else weights


def prompt_change(module, pixels, prompt, off=0.0, relative_to="base", measure="output"):
    """‖y₁ − y₀‖ / ‖y₀‖ of the block between η = `off` and η = 1, and likely slips."""
    with torch.no_grad():
        outputs = []
        for eta in [off, 1.0]:
            set_strength(module, eta)
            if measure == "output":
                outputs.append(module(pixels, encoder_hidden_states=prompt))
            else:
                outputs.append(module.to_k(prompt))
    y0, y1 = outputs
    change = (y1 - y0).norm()
    if relative_to == "base":
        change = change / y0.norm()
    elif relative_to == "adapted":
        change = change / y1.norm()
    return change.item()


def change_of_the_trained_prompt(module, pixels, prompt):
    _, _, trained_prompt = to_k_adapter()
    return prompt_change(module, pixels, trained_prompt)


def left_switched_off(module, pixels, prompt):
    change = prompt_change(module, pixels, prompt)
    set_strength(module, 0.0)
    return change


TRUTH_6_5 = adapter_params_by_part("diffusers", "lora", rank=1)[TEXT_READING]
WIDTHS = [320] * 5 + [640] * 5 + [1280] * 6


def lora(d_out, d_in, r):
    return count_params("lora", d_out, d_in, r)


CASES = [
    (
        checks.check_split_heads,
        split_heads,
        [
            (lambda x, h: x.reshape(x.shape[0], h, x.shape[1], -1), "then swap tokens and heads"),
            (lambda x, h: x.reshape(x.shape[0], x.shape[1], h, -1), "returned shape"),
            (
                lambda x, h: x.reshape(x.shape[0], x.shape[1], -1, h).permute(0, 3, 1, 2),
                "head i holds columns",
            ),
        ],
    ),
    (
        checks.check_causal_mask,
        causal_mask,
        [
            (
                lambda t: torch.triu(torch.full((t, t), float("-inf")), diagonal=0),
                "the diagonal stays 0",
            ),
            (
                lambda t: torch.tril(torch.full((t, t), float("-inf")), diagonal=-1),
                "the mask is transposed",
            ),
            (lambda t: torch.tril(torch.ones(t, t)), "use 0 and −inf, not 1 and 0"),
            (mask_filled_with(-10.0), "a mask entry of -10 lowers a score without removing it"),
            (lambda t: causal_mask(t) == 0, "make it a float tensor"),
        ],
    ),
    (
        checks.check_attention,
        reference_attention,
        [
            (lambda *a: attention(*a, scale=False), "divide the scores by √d"),
            (lambda *a: attention(*a, whole=True), "not by √d_model"),
            (lambda *a: attention(*a, split=False), "single-head attention"),
            (softmax_over(-2), "the softmax ran over the queries (dim=-2)"),
            (softmax_over(1), "the softmax ran over the heads (dim=1)"),
        ],
    ),
    (
        checks.check_block_lora_params,
        lambda d, c, r: 2 * lora(d, d, r) + 2 * lora(d, c, r),
        [
            (lambda d, c, r: 4 * lora(d, d, r), "d_model × d_context, not d_model × d_model"),
            (lambda d, c, r: 3 * lora(d, d, r) + lora(d, c, r), "both to_k and to_v"),
            (lambda d, c, r: 4 * r * d, "sum r·(d_in + d_out)"),
        ],
    ),
    (
        checks.check_predict_text_reading_params,
        TRUTH_6_5,
        [
            (4 * TRUTH_6_5, "the chapter's table, at r = 4"),
            (TRUTH_6_5 // 2, "count both"),
            (sum(4 * d for d in WIDTHS), "not r·(2·d_model)"),
            (sum(2 * d for d in WIDTHS), "a LoRA has two factors"),
            (TRUTH_6_5 + sum(4 * d for d in WIDTHS), "only k and v read the text"),
            (1_000_000, "there are 16 cross-attention blocks"),
            (49_536.0, "write a whole number"),
        ],
    ),
    (
        checks.check_score_std,
        lambda d, scaled: 1.0 if scaled else math.sqrt(d),
        [
            (lambda d, scaled: 1.0 if scaled else float(d), "that is the variance"),
            (lambda d, scaled: 1 / math.sqrt(d) if scaled else math.sqrt(d), "√d / √d"),
            (lambda d, scaled: 1.0, "variances add"),
            (lambda d, scaled: 1.0 if scaled else d / 2, "counterexample: score_std(1"),
            (lambda d, scaled: 1.0 if scaled else d / 2, "Var(q_i·k_i)"),
        ],
    ),
    (
        checks.check_causal_weights,
        lambda q, k: causal_weights(q, k),
        [
            (lambda q, k: causal_weights(q, k, diagonal=0), "row 0 is NaN"),
            (lambda q, k: causal_weights(q, k, diagonal=0, nan_to_zero=True), "no longer sum to 1"),
            (lambda q, k: causal_weights(q, k, after=True), "no longer sum to 1"),
            (lambda q, k: causal_weights(q, k, diagonal=2), "attends to a later token"),
            (lambda q, k: causal_weights(q, k, scale=False), "Q·Kᵀ / √d"),
        ],
    ),
    (
        checks.check_prompt_change,
        prompt_change,
        [
            (lambda m, x, p: prompt_change(m, x, p, off=1.0), "the change is 0"),
            (lambda m, x, p: prompt_change(m, x, p, relative_to=None), "that is ‖y₁ − y₀‖"),
            (lambda m, x, p: prompt_change(m, x, p, relative_to="adapted"), "not by the adapted"),
            (lambda m, x, p: prompt_change(m, x, p, measure="keys"), "how much the keys changed"),
            (change_of_the_trained_prompt, "run the block on the prompt you were given"),
            (left_switched_off, "set the strength back to 1"),
            (lambda m, x, p: str(prompt_change(m, x, p)), "expected a number"),
        ],
    ),
]

test_check_passes_on_the_reference, test_check_explains_a_wrong_answer = check_tests(CASES)


@pytest.mark.parametrize(
    "mask",
    [
        mask_filled_with(torch.finfo(torch.float32).min),  # transformers' CLIP
        mask_filled_with(-1e9),
        lambda t: causal_mask(t, torch.float64),
        lambda t: torch.zeros(t, t).masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), -1e30),
    ],
    ids=["finfo_min", "minus_1e9", "float64_inf", "masked_fill"],
)
def test_causal_mask_accepts_any_mask_that_gives_the_same_weights(mask, capsys) -> None:
    checks.check_causal_mask(mask)
    assert capsys.readouterr().out.startswith("✓ causal_mask")


def test_a_to_k_adapter_changes_prompts_it_never_saw_and_not_its_null_space() -> None:
    """What exercise 6.8's check reports: every other prompt moves, the null-space one does not."""
    module, pixels, prompt = to_k_adapter()
    trained = prompt_change(module, pixels, prompt)
    others = [prompt_change(module, pixels, other_prompt(seed)) for seed in range(3)]
    down = module.to_k.adapters["default"].lora_down
    c = other_prompt(3)
    blind = c - c @ torch.linalg.pinv(down) @ down
    assert trained > 0.1 and min(others) > 0.1
    assert prompt_change(module, pixels, blind) < 1e-5
