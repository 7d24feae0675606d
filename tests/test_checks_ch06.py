"""Chapter 06's checks pass on the reference answers and explain plausible wrong ones."""

from __future__ import annotations

import math

import torch
from check_cases import check_tests

from lokr_edu import checks
from lokr_edu.adapters import inject
from lokr_edu.attention import (
    adapter_params_by_part,
    causal_mask,
    multi_head_attention,
    split_heads,
)
from lokr_edu.checks.ch06 import TEXT_READING, corner_mask, map_setup, token_weights
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


def softmax_over_queries(x, context, W_q, W_k, W_v, W_o, b_o, heads):
    q, k, v = (split_heads(t, heads) for t in (x @ W_q.T, context @ W_k.T, context @ W_v.T))
    weights = (q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])).softmax(-2)
    out = (weights @ v).transpose(1, 2).reshape(x.shape[0], x.shape[1], -1)
    return out @ W_o.T + b_o


def causal_weights(q, k, diagonal=1, after=False, nan_to_zero=False, scale=True):
    t = q.shape[-2]
    scores = q @ k.transpose(-1, -2) / (math.sqrt(q.shape[-1]) if scale else 1.0)
    if after:  # mask the weights after the softmax
        return scores.softmax(-1) * torch.tril(torch.ones(t, t, dtype=q.dtype))
    mask = torch.triu(torch.full((t, t), float("-inf"), dtype=q.dtype), diagonal=diagonal)
    weights = (scores + mask).softmax(-1)
    return weights.nan_to_num(0.0) if nan_to_zero else weights


def to_q_experiment(targets=("to_q",), steps=60, unfreeze=False):
    module, pixels, prompt = map_setup()
    inject(module, list(targets), method="lora", rank=2, alpha=2.0)
    if unfreeze:
        module.requires_grad_(True)
    corner = corner_mask()
    optimizer = torch.optim.Adam([p for p in module.parameters() if p.requires_grad], lr=0.05)
    for _ in range(steps):
        m = token_weights(module, pixels, prompt)[:, 3]
        loss = -torch.log(m[corner]).mean() - torch.log(1 - m[~corner]).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return module


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
        ],
    ),
    (
        checks.check_attention,
        reference_attention,
        [
            (lambda *a: attention(*a, scale=False), "divide the scores by √d"),
            (lambda *a: attention(*a, whole=True), "not by √d_model"),
            (lambda *a: attention(*a, split=False), "single-head attention"),
            (softmax_over_queries, "softmax over the context tokens"),
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
        checks.check_to_q_experiment,
        to_q_experiment,
        [
            (lambda: map_setup()[0], "no adapter"),
            (lambda: to_q_experiment(["to_k"], steps=1), "adapters sit on ['to_k']"),
            (lambda: to_q_experiment(steps=0), "train the adapter"),
            (lambda: to_q_experiment(steps=3, unfreeze=True), "the base weight"),
            (lambda: "to_q", "return the trained attention module"),
            (lambda: map_setup()[0].to_v(None), "to_q_experiment raised TypeError when run"),
        ],
    ),
]

test_check_passes_on_the_reference, test_check_explains_a_wrong_answer = check_tests(CASES)
