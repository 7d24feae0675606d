"""Chapter 06's checks pass on the reference answers and explain plausible wrong ones."""

from __future__ import annotations

import math

import torch
from check_cases import check_tests

from lokr_edu import checks
from lokr_edu.attention import causal_mask, multi_head_attention, split_heads
from lokr_edu.lowrank import count_params


def attention(x, context, W_q, W_k, W_v, W_o, b_o, heads, scale=True, split=True):
    h = heads if split else 1
    q, k, v = (split_heads(t, h) for t in (x @ W_q.T, context @ W_k.T, context @ W_v.T))
    scores = q @ k.transpose(-1, -2) / (math.sqrt(q.shape[-1]) if scale else 1.0)
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
]

test_check_passes_on_the_reference, test_check_explains_a_wrong_answer = check_tests(CASES)
