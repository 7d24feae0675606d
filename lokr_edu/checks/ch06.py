"""Checks for chapter 06's exercises (solutions/06_attention_and_lora_solutions.ipynb)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from lokr_edu.attention import causal_mask, multi_head_attention, split_heads
from lokr_edu.checks.common import CheckError, call_student, passed, random_tensor, require_tensor
from lokr_edu.lowrank import count_params

__all__ = [
    "check_split_heads",
    "check_causal_mask",
    "check_attention",
    "check_block_lora_params",
]


def check_split_heads(split_heads_fn: Callable[[torch.Tensor, int], torch.Tensor]) -> None:
    """Exercise 6.1: (batch, tokens, d_model) -> (batch, heads, tokens, d_model / heads)."""
    for batch, tokens, d_model, heads in [(2, 5, 12, 3), (1, 77, 768, 12), (3, 4, 8, 8)]:
        x = random_tensor(batch, tokens, d_model, seed=tokens)
        context = f"for x of shape {(batch, tokens, d_model)} and {heads} heads"
        got = call_student("split_heads", split_heads_fn, x, heads, context=context)
        d = d_model // heads
        require_tensor("split_heads", got, (batch, heads, tokens, d), context)
        want = split_heads(x, heads)
        if torch.equal(got, want):
            continue
        if torch.equal(got, x.reshape(batch, heads, tokens, d)):
            hint = "reshape to (batch, tokens, heads, d) first, then swap tokens and heads"
        else:
            hint = f"head i holds columns i·{d} … i·{d} + {d - 1} of every token"
        raise CheckError(f"split_heads is wrong {context}: {hint}")
    passed("split_heads gives each head its own slice of the features")


def check_causal_mask(causal_mask_fn: Callable[[int], torch.Tensor]) -> None:
    """Exercise 6.2: the additive (tokens × tokens) mask, 0 where t' ≤ t, −∞ where t' > t."""
    for tokens in [1, 4, 77]:
        got = call_student("causal_mask", causal_mask_fn, tokens, context=f"for {tokens} tokens")
        require_tensor("causal_mask", got, (tokens, tokens), f"for {tokens} tokens")
        want = causal_mask(tokens, got.dtype)
        if torch.equal(got, want):
            continue
        if torch.isinf(got.diagonal()).any():
            hint = "a token may see itself: the diagonal stays 0"
        elif tokens > 1 and torch.isinf(got[1, 0]):
            hint = "the mask is transposed: token t sees tokens ≤ t, so −∞ goes above the diagonal"
        elif ((got == 0) | (got == 1)).all():
            hint = "the mask is added to the scores before the softmax: use 0 and −inf, not 1 and 0"
        else:
            hint = "0 on and below the diagonal, −inf above it"
        raise CheckError(f"causal_mask({tokens}) is wrong: {hint}")
    passed("causal_mask lets token t see exactly the tokens up to t")


def check_attention(attention: Callable[..., torch.Tensor]) -> None:
    """Exercise 6.3: multi-head cross-attention with an output projection."""
    torch.manual_seed(0)
    for d_model, d_context, heads, tq, tk in [
        (16, 12, 4, 6, 5),
        (8, 8, 2, 3, 3),
        (12, 20, 3, 7, 9),
    ]:
        weights = {
            "W_q": random_tensor(d_model, d_model, seed=1) / math.sqrt(d_model),
            "W_k": random_tensor(d_model, d_context, seed=2) / math.sqrt(d_context),
            "W_v": random_tensor(d_model, d_context, seed=3) / math.sqrt(d_context),
            "W_o": random_tensor(d_model, d_model, seed=4) / math.sqrt(d_model),
            "b_o": random_tensor(d_model, seed=5),
        }
        x, context_tokens = (
            random_tensor(2, tq, d_model, seed=6),
            random_tensor(2, tk, d_context, seed=7),
        )
        args = (
            x,
            context_tokens,
            weights["W_q"],
            weights["W_k"],
            weights["W_v"],
            weights["W_o"],
            weights["b_o"],
            heads,
        )
        where = f"for d_model {d_model}, {heads} heads, {tq} queries, {tk} context tokens"
        got = call_student("attention", attention, *args, context=where)
        require_tensor("attention", got, (2, tq, d_model), where)
        want = multi_head_attention(x, context_tokens, weights, heads)
        if torch.allclose(got, want):
            continue
        unscaled = dict(weights, W_q=weights["W_q"] * math.sqrt(d_model // heads))
        if torch.allclose(got, multi_head_attention(x, context_tokens, unscaled, heads)):
            hint = "divide the scores by √d, with d = d_model / heads (the width of one head)"
        elif torch.allclose(got, multi_head_attention(x, context_tokens, weights, 1)):
            hint = "that is single-head attention: split Q, K, V into heads first"
        else:
            hint = (
                "softmax over the context tokens (the last axis of Q·Kᵀ), "
                "then ·V, merge heads, ·W_oᵀ + b_o"
            )
        raise CheckError(f"attention is wrong {where}: {hint}")
    passed("attention matches the multi-head formula with its output projection")


def check_block_lora_params(block_lora_params: Callable[[int, int, int], int]) -> None:
    """Exercise 6.4: LoRA parameters on to_q, to_k, to_v, to_out.0 of one attention block."""
    for d_model, d_context, rank in [(320, 768, 4), (1280, 1280, 8), (640, 768, 1)]:
        call = f"block_lora_params(d_model={d_model}, d_context={d_context}, r={rank})"
        got = call_student(
            "block_lora_params", block_lora_params, d_model, d_context, rank, context=f"for {call}"
        )
        want = (
            count_params("lora", d_model, d_model, rank)  # to_q: d_model -> d_model
            + 2 * count_params("lora", d_model, d_context, rank)  # to_k, to_v: d_context -> d_model
            + count_params("lora", d_model, d_model, rank)  # to_out.0
        )
        if got == want:
            continue
        if got == 4 * count_params("lora", d_model, d_model, rank):
            hint = (
                "to_k and to_v read the context: "
                "they are d_model × d_context, not d_model × d_model"
            )
        elif got == 3 * count_params("lora", d_model, d_model, rank) + count_params(
            "lora", d_model, d_context, rank
        ):
            hint = "both to_k and to_v take the context as input"
        else:
            hint = "sum r·(d_in + d_out) over the four projections"
        raise CheckError(f"{call} returned {got}; expected {want}: {hint}")
    passed("block_lora_params counts the four projections of self- and cross-attention")
