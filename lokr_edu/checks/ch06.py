"""Checks for chapter 06's exercises (solutions/06_attention_and_lora_solutions.ipynb)."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch

from lokr_edu.attention import (
    adapter_params_by_part,
    attention_weights,
    causal_mask,
    effective_weight,
    merge_heads,
    multi_head_attention,
    split_heads,
)
from lokr_edu.checks.common import CheckError, call_student, passed, random_tensor, require_tensor
from lokr_edu.lowrank import count_params

__all__ = [
    "check_split_heads",
    "check_causal_mask",
    "check_attention",
    "check_block_lora_params",
    "check_predict_text_reading_params",
    "check_score_std",
    "check_causal_weights",
    "check_prompt_change",
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
    """Exercise 6.2: the additive (tokens × tokens) mask, 0 where t' ≤ t and −∞ (or any number
    whose exp is 0, such as torch.finfo(dtype).min, as transformers' CLIP uses) where t' > t.
    The mask is judged by the attention weights softmax(S + M) it gives on random scores S."""
    for tokens in [1, 4, 77]:
        got = call_student("causal_mask", causal_mask_fn, tokens, context=f"for {tokens} tokens")
        require_tensor("causal_mask", got, (tokens, tokens), f"for {tokens} tokens")
        if not got.is_floating_point():
            raise CheckError(
                f"causal_mask({tokens}) has dtype {got.dtype}: the mask is added to float "
                "scores, so make it a float tensor (0 and −inf)"
            )
        scores = random_tensor(tokens, tokens, seed=tokens).to(got.dtype)
        want = (scores + causal_mask(tokens, got.dtype)).softmax(dim=-1)
        weights = (scores + got).softmax(dim=-1)
        if torch.allclose(weights, want, atol=1e-6) and not weights.isnan().any():
            continue
        very_negative = got < -1e4  # exp of such a score is 0 in any float dtype
        if very_negative.diagonal().any():
            hint = "a token may see itself: the diagonal stays 0"
        elif tokens > 1 and very_negative[1, 0]:
            hint = "the mask is transposed: token t sees tokens ≤ t, so −∞ goes above the diagonal"
        elif ((got == 0) | (got == 1)).all():
            hint = "the mask is added to the scores before the softmax: use 0 and −inf, not 1 and 0"
        elif (
            tokens > 1 and (got.triu(diagonal=1) < 0).any() and (weights.triu(diagonal=1) > 0).any()
        ):
            hint = (
                f"the masked entries still get weight: a mask entry of {got[0, 1].item():g} "
                "lowers a score without removing it. Use −inf, or a number so negative that "
                "exp gives exactly 0, such as torch.finfo(dtype).min"
            )
        else:
            hint = "0 on and below the diagonal, −inf above it"
        raise CheckError(f"causal_mask({tokens}) is wrong: {hint}")
    passed("causal_mask lets token t see exactly the tokens up to t")


def _softmax_axis(
    got: torch.Tensor,
    x: torch.Tensor,
    context: torch.Tensor,
    weights: dict[str, torch.Tensor],
    heads: int,
) -> str | None:
    """The axis a wrong softmax ran over, if `got` is multi-head attention with the softmax of the
    scores (batch, heads, queries, context tokens) taken over another axis; else None."""
    q, k, v = (
        split_heads(t @ weights[f"W_{n}"].T, heads)
        for t, n in [(x, "q"), (context, "k"), (context, "v")]
    )
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    for dim, name in [(-2, "queries (dim=-2)"), (1, "heads (dim=1)"), (0, "batch (dim=0)")]:
        out = merge_heads(scores.softmax(dim=dim) @ v) @ weights["W_o"].T + weights["b_o"]
        if torch.allclose(got, out):
            return name
    return None


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
        elif torch.allclose(
            got,
            multi_head_attention(
                x,
                context_tokens,
                dict(weights, W_q=weights["W_q"] * math.sqrt((d_model // heads) / d_model)),
                heads,
            ),
        ):
            hint = "d is the width of one head, d_model / heads: divide by √d, not by √d_model"
        elif torch.allclose(got, multi_head_attention(x, context_tokens, weights, 1)):
            hint = "that is single-head attention: split Q, K, V into heads first"
        elif axis := _softmax_axis(got, x, context_tokens, weights, heads):
            hint = (
                f"the softmax ran over the {axis}; each query's weights must be a distribution "
                "over the context tokens, the last axis of Q·Kᵀ (softmax(dim=-1))"
            )
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


# ---- exercises 6.5–6.8: predict, derive, debug, explore ----------------------------------------

TEXT_READING = "U-Net cross-attention k, v (read the text)"


def check_predict_text_reading_params(prediction: int) -> None:
    """Exercise 6.5: LoRA r = 1 parameters on every attn2.to_k and attn2.to_v of SD1.5's U-Net."""
    if isinstance(prediction, bool) or not isinstance(prediction, int):
        raise CheckError(f"prediction is {prediction!r}: write a whole number, e.g. 12_345")
    truth = adapter_params_by_part("diffusers", "lora", rank=1)[TEXT_READING]
    if prediction == truth:
        passed(
            f"{truth:,} LoRA r = 1 numbers read the text: "
            "16 blocks × 2 projections × (768 + d_model)"
        )
        return
    widths = [320] * 5 + [640] * 5 + [1280] * 6  # d_model of the 16 cross-attention blocks
    image_side = sum(2 * (d + d) for d in widths)  # attn2.to_q and attn2.to_out.0
    hints = {
        4 * truth: "that is the chapter's table, at r = 4; every count is proportional to r",
        truth // 2: "to_k and to_v both read the text: count both",
        sum(2 * (d + d) for d in widths): (
            "to_k and to_v take the 768-wide text as input: r·(768 + d_model), not r·(2·d_model)"
        ),
        sum(2 * d for d in widths): "a LoRA has two factors: r·d_in for A and r·d_out for B",
        truth + image_side: "to_q and to_out.0 work on the image side: only k and v read the text",
    }
    hint = hints.get(
        prediction,
        "there are 16 cross-attention blocks (widths 320 ×5, 640 ×5, 1280 ×6); each to_k and "
        "to_v is 768 → d_model, and LoRA r = 1 costs 768 + d_model there",
    )
    raise CheckError(
        f"you predicted {prediction:,}; the truth is {truth:,} "
        f"({prediction / truth:.2f}× the truth): {hint}"
    )


def check_score_std(score_std: Callable[[int, bool], float]) -> None:
    """Exercise 6.6 (derive): the std of q·k (and of q·k/√d) for independent N(0, 1) entries."""
    generator = torch.Generator().manual_seed(0)
    samples = 4000
    for d in [1, 2, 3, 5, 8, 16, 40, 64, 100, 160, 320, 768]:  # the search for a counterexample
        q = torch.randn(samples, d, generator=generator, dtype=torch.float64)
        k = torch.randn(samples, d, generator=generator, dtype=torch.float64)
        scores = (q * k).sum(-1)
        for scaled in [False, True]:
            measured = (scores / math.sqrt(d) if scaled else scores).std().item()
            call = f"score_std({d}, scaled={scaled})"
            got = call_student("score_std", score_std, d, scaled, context=f"for {call}")
            if isinstance(got, torch.Tensor):
                got = got.item()
            if not isinstance(got, int | float):
                raise CheckError(f"{call} returned {type(got).__name__}; expected a number")
            if abs(got - measured) <= 0.06 * measured:
                continue
            if d > 1 and abs(got - measured**2) <= 0.1 * measured**2:
                hint = "that is the variance (d for q·k): the standard deviation is its square root"
            elif scaled and d > 1 and abs(got - 1 / math.sqrt(d)) < 1e-9:
                hint = "dividing by √d divides the standard deviation by √d: √d / √d"
            elif not scaled and abs(got - 1.0) < 1e-9:
                hint = (
                    "q·k adds d independent products, each of variance 1: variances add, so "
                    "Var(q·k) = d"
                )
            else:
                hint = "Var(q_i·k_i) = E[q_i²]·E[k_i²] = 1, and the d products are independent"
            raise CheckError(
                f"counterexample: {call} returned {got:.3g}, but {samples} samples measure "
                f"{measured:.3g}: {hint}"
            )
    passed(
        "score_std matches the measured spread for every d tried: q·k grows like √d, and "
        "dividing by √d keeps the scores O(1) at every width"
    )


def check_causal_weights(
    causal_weights: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> None:
    """Exercise 6.7 (debug): softmax(Q·Kᵀ/√d + M) with CLIP's causal mask, rows summing to 1."""
    for tokens, d in [(5, 4), (77, 64), (1, 8)]:
        q, k = random_tensor(2, 3, tokens, d, seed=tokens), random_tensor(2, 3, tokens, d, seed=d)
        where = f"for {tokens} tokens"
        got = call_student("causal_weights", causal_weights, q, k, context=where)
        require_tensor("causal_weights", got, (2, 3, tokens, tokens), where)
        want = attention_weights(q, k, causal_mask(tokens, q.dtype))
        if torch.allclose(got, want):
            continue
        rows = got.sum(-1)
        if torch.isnan(got).any():
            row = torch.isnan(got).any(-1).nonzero()[0, -1].item()
            hint = (
                f"row {row} is NaN: its scores are all −∞ and softmax divides 0 by 0. Every "
                "token must see at least itself, so the −∞ belong strictly above the diagonal"
            )
        elif not torch.allclose(rows, torch.ones_like(rows)):
            hint = (
                "the rows no longer sum to 1: masking after the softmax (or replacing NaN by 0) "
                "drops probability; add the −∞ mask to the scores before the softmax"
            )
        elif (got.triu(diagonal=1) > 0).any():
            hint = "a token attends to a later token: the −∞ go above the diagonal, t' > t"
        elif tokens > 1 and (got.diagonal(dim1=-2, dim2=-1)[..., 1:] == 0).all():
            hint = "no token attends to itself: the diagonal must stay 0 in the mask"
        else:
            hint = "the causal part is right; check the scores: Q·Kᵀ / √d with d = q.shape[-1]"
        raise CheckError(f"causal_weights is wrong {where}: {hint}")
    passed("causal_weights: each token attends to itself and the tokens before it, rows sum to 1")


# the attention-map experiment of exercise 6.8: one cross-attention block, 16×16 pixels, 8 tokens
MAP_TOKEN, MAP_CORNER = 3, 6


def map_setup() -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """(an untrained diffusers cross-attention, 16×16 pixels with an object in the top-left
    corner, an 8-token prompt): the same every call."""
    from diffusers.models.attention_processor import Attention

    torch.manual_seed(0)
    module = Attention(query_dim=32, cross_attention_dim=32, heads=4, dim_head=8, bias=False)
    pixels = 0.1 * torch.randn(16, 16, 32)
    pixels[:MAP_CORNER, :MAP_CORNER] += torch.randn(32)  # the "object"
    prompt = torch.randn(1, 8, 32)
    return module.eval(), pixels.reshape(1, 256, 32), prompt


def corner_mask() -> torch.Tensor:
    corner = torch.zeros(16, 16, dtype=torch.bool)
    corner[:MAP_CORNER, :MAP_CORNER] = True
    return corner.reshape(256)


def token_weights(
    module: torch.nn.Module, pixels: torch.Tensor, prompt: torch.Tensor
) -> torch.Tensor:
    """(256 pixels, 8 tokens): each pixel's attention over the prompt, averaged over heads, with
    W̃ = W + η·ΔW read off adapted projections."""
    W_q, _ = effective_weight(module.to_q)
    W_k, _ = effective_weight(module.to_k)
    q, k = split_heads(pixels @ W_q.T, module.heads), split_heads(prompt @ W_k.T, module.heads)
    return attention_weights(q, k)[0].mean(0)


def to_k_adapter() -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """(the block of `map_setup` with a LoRA (r = 2, α = 2) on to_k, trained for 60 Adam steps at
    lr 0.05 so that token 3 is attended to inside the corner and not outside, the pixels, the
    prompt it was trained on): the chapter's section 5 on one block. A fresh copy every call."""
    import copy

    return copy.deepcopy(_trained_to_k())


@functools.cache
def _trained_to_k() -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    from lokr_edu.adapters import inject

    module, pixels, prompt = map_setup()
    inject(module, ["to_k"], method="lora", rank=2, alpha=2.0)
    corner = corner_mask()
    optimizer = torch.optim.Adam([p for p in module.parameters() if p.requires_grad], lr=0.05)
    for _ in range(60):
        attention = token_weights(module, pixels, prompt)[:, MAP_TOKEN]  # (256,)
        loss = -torch.log(attention[corner]).mean() - torch.log(1 - attention[~corner]).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    module.requires_grad_(False)  # the trained adapter is only measured from here on
    return module, pixels, prompt


def other_prompt(seed: int) -> torch.Tensor:
    """Another 8-token prompt (1, 8, 32), drawn like map_setup's: one the adapter never saw."""
    return torch.randn(1, 8, 32, generator=torch.Generator().manual_seed(100 + seed))


def _block_outputs(module: torch.nn.Module, pixels: torch.Tensor, prompt: torch.Tensor):
    """The block's output with its adapter off (η = 0) and on (η = 1), and its keys likewise."""
    from lokr_edu.adapters import set_strength

    outputs, keys = [], []
    with torch.no_grad():
        for eta in [0.0, 1.0]:
            set_strength(module, eta)
            outputs.append(module(pixels, encoder_hidden_states=prompt))
            keys.append(module.to_k(prompt))
    set_strength(module, 1.0)
    return outputs, keys


def check_prompt_change(prompt_change: Callable[..., float]) -> None:
    """Exercise 6.8 (explore): the relative change ‖y₁ − y₀‖ / ‖y₀‖ that a to_k adapter makes to
    the block's output y = attn(pixels, prompt), for the prompt it was trained on and others."""
    import copy

    trained, pixels, prompt = to_k_adapter()
    down = trained.to_k.adapters["default"].lora_down.detach()  # (2, 32): ΔW_k = s·up·down
    others = torch.cat([other_prompt(seed) for seed in range(3)])  # (3, 8, 32)
    blind = other_prompt(3) - other_prompt(3) @ torch.linalg.pinv(down) @ down  # down·c = 0
    prompts = {
        "the prompt it was trained on": prompt,
        "another prompt (1)": others[:1],
        "another prompt (2)": others[1:2],
        "another prompt (3)": others[2:],
        "a prompt in ΔW_k's null space": blind,
    }
    measured = {}
    for label, p in prompts.items():
        (y0, y1), (k0, k1) = _block_outputs(copy.deepcopy(trained), pixels, p)
        want = ((y1 - y0).norm() / y0.norm()).item()
        module = copy.deepcopy(trained)
        where = f"for {label}"
        got = call_student("prompt_change", prompt_change, module, pixels, p, context=where)
        if isinstance(got, torch.Tensor) and got.numel() == 1:
            got = got.item()
        if isinstance(got, bool) or not isinstance(got, int | float):
            raise CheckError(
                f"prompt_change returned {type(got).__name__} {where}; expected a number, "
                "‖y₁ − y₀‖ / ‖y₀‖"
            )
        with torch.no_grad():
            after = module(pixels, encoder_hidden_states=p)
        if not torch.allclose(after, y1, atol=1e-6):
            raise CheckError(
                f"after prompt_change {where} the block no longer computes its adapted output: "
                "set the strength back to 1 (set_strength(module, 1.0)) once you have measured"
            )
        measured[label] = want
        if math.isclose(got, want, rel_tol=1e-3, abs_tol=1e-5):
            continue
        if abs(got) < 1e-9 < want:
            hint = (
                "the change is 0: compare the block with the adapter off, set_strength(module, "
                "0.0), and on, set_strength(module, 1.0)"
            )
        elif math.isclose(got, (y1 - y0).norm().item(), rel_tol=1e-3):
            hint = "that is ‖y₁ − y₀‖: divide it by ‖y₀‖, the size of the base block's output"
        elif math.isclose(got, ((y1 - y0).norm() / y1.norm()).item(), rel_tol=1e-3):
            hint = "divide by ‖y₀‖, the base block's output (η = 0), not by the adapted one's"
        elif math.isclose(got, ((k1 - k0).norm() / k0.norm()).item(), rel_tol=1e-3):
            hint = (
                "that is how much the keys changed: measure the block's output, "
                "module(pixels, encoder_hidden_states=prompt)"
            )
        elif label != "the prompt it was trained on" and math.isclose(
            got, measured["the prompt it was trained on"], rel_tol=1e-3
        ):
            hint = (
                "that is the change for the prompt the adapter was trained on: run the block on "
                "the prompt you were given"
            )
        else:
            hint = (
                "y₀ = module(pixels, encoder_hidden_states=prompt) at η = 0, y₁ the same at η = 1, "
                "and the answer ‖y₁ − y₀‖ / ‖y₀‖ as a float"
            )
        raise CheckError(f"prompt_change {where} returned {got:.4g}; expected {want:.4g}: {hint}")
    trained_change = measured["the prompt it was trained on"]
    other_changes = [measured[f"another prompt ({i})"] for i in (1, 2, 3)]
    blind_change = measured["a prompt in ΔW_k's null space"]
    passed(
        "prompt_change measures what the to_k adapter does to the block's output\n"
        f"  the prompt it was trained on:   {trained_change:.0%}\n"
        f"  three prompts it never saw:     " + ", ".join(f"{c:.0%}" for c in other_changes) + "\n"
        f"  a prompt in ΔW_k's null space:  {blind_change:.1%}\n"
        "W_k turns every token of every prompt into a key, so the adapter changes every prompt "
        "except one whose tokens its down factor maps to zero"
    )
