"""LoKr training-step time and memory: lokr_edu against peft and lycoris-lora, in one run.

    python benchmarks/bench_lokr.py            # full table (a few minutes on 2 cores)
    python benchmarks/bench_lokr.py --smoke    # one small shape, one step (used by the tests)

For each SD1.5 layer shape and token count, one training step (forward, backward with the input
requiring grad as inside a network, Adam step) of a single adapted nn.Linear, for:

    base               the frozen layer alone (the floor every adapter adds to)
    lokr_edu reshape   LoKr applied as W1·X·W2ᵀ, never building W1 ⊗ W2 (lokr_edu.kron_apply)
    lokr_edu material. lokr_edu's LoKr forced to build ΔW = W1 ⊗ W2 first
    peft               peft's LoKr (rebuilds ΔW with torch.kron at every forward)
    lycoris            lycoris-lora's LoKr, default mode (rebuilds ΔW)
    lycoris bypass     lycoris-lora's LoKr with bypass_mode=True (its own reshape path)
    lora r=8           lokr_edu's LoRA at rank 8, for scale

All LoKr variants use rank 8, α = 8, LyCORIS's default layout, and the same factor values.
Time: median of 5 timed steps after 1 warm-up, torch.set_num_threads(2). Memory: the bytes
autograd keeps for the backward pass (tensors saved during the forward, counted once per
storage) beyond those the base layer keeps: the activation memory an adapter adds per layer.
Results: benchmarks/results/lokr_cpu.md and lokr_cpu.png.
"""

from __future__ import annotations

import argparse
import logging
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

from lokr_edu.adapters import inject
from lokr_edu.kron_apply import choose_mode
from lokr_edu.lowrank import lokr_factors

RESULTS = Path(__file__).parent / "results"
SHAPES = [
    (320, 320),
    (640, 640),
    (1280, 1280),
    (3072, 768),
    (768, 3072),
    (10240, 1280),
]  # (out, in)
TOKENS = [77, 1024, 4096]
BATCH, RANK = 2, 8
VARIANTS = [
    "base",
    "lokr_edu reshape",
    "lokr_edu materialize",
    "peft",
    "lycoris",
    "lycoris bypass",
    "lora r=8",
]


class WithNetwork(nn.Module):
    """lycoris-lora patches the layer's forward and keeps the factors in a separate network:
    hold both, so that parameters() sees the factors and forward runs the patched layer."""

    def __init__(self, model: nn.Module, network: nn.Module) -> None:
        super().__init__()
        self.model, self.network = model, network

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def _base(out_features: int, in_features: int) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(in_features, out_features))


def build(
    variant: str, out_features: int, in_features: int, reference: nn.Module | None
) -> nn.Module:
    """One adapted layer; LoKr factors copied from `reference` (lokr_edu's) so all agree."""
    model = _base(out_features, in_features)
    if variant == "base":
        model.requires_grad_(False)
        return model
    if variant.startswith("lokr_edu"):
        mode = variant.split()[1]
        inject(model, "0", "lokr", rank=RANK, alpha=RANK, lokr_mode=mode)
    elif variant == "lora r=8":
        inject(model, "0", "lora", rank=RANK, alpha=RANK)
    elif variant == "peft":
        from peft import LoKrConfig, get_peft_model

        model = get_peft_model(model, LoKrConfig(r=RANK, alpha=RANK, target_modules=["0"]))
    else:
        from lycoris import create_lycoris

        logging.getLogger("LyCORIS").setLevel(logging.ERROR)
        network = create_lycoris(
            model,
            1.0,
            linear_dim=RANK,
            linear_alpha=RANK,
            algo="lokr",
            bypass_mode=variant.endswith("bypass"),
        )
        network.apply_to()
        model.requires_grad_(False)
        network.requires_grad_(True)
        model = WithNetwork(model, network)
    if reference is not None:
        _copy_factors(reference, model)
    return model


def _copy_factors(reference: nn.Module, model: nn.Module) -> None:
    values = {n.rsplit(".", 1)[-1]: p for n, p in reference.named_parameters() if "lokr_" in n}
    with torch.no_grad():
        for name, p in model.named_parameters():
            key = name.replace(".default", "").rsplit(".", 1)[-1]
            if key in values and p.shape == values[key].shape:
                p.copy_(values[key])


def saved_bytes(model: nn.Module, x: torch.Tensor) -> int:
    """Bytes of the tensors autograd saves during one forward (each storage counted once)."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x).sum()
    return sum(storages.values())


def step_seconds(model: nn.Module, x: torch.Tensor, steps: int, warmup: int) -> float:
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(parameters, lr=1e-4) if parameters else None
    times = []
    for i in range(warmup + steps):
        start = time.perf_counter()
        x.grad = None
        model(x).sum().backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def run(shapes, tokens, steps: int = 5, warmup: int = 1, variants=VARIANTS) -> list[dict]:
    rows = []
    for out_features, in_features in shapes:
        reference = build("lokr_edu reshape", out_features, in_features, None)
        with torch.no_grad():
            for p in reference.parameters():
                if p.requires_grad:
                    p.normal_(std=0.02)
        (a, b), (c, d) = lokr_factors(out_features, in_features)
        w2 = "full" if RANK >= max(c, d) / 2 else "low-rank"
        for n_tokens in tokens:
            x = torch.randn(BATCH, n_tokens, in_features, requires_grad=True)
            base_bytes = None
            for variant in variants:
                model = build(variant, out_features, in_features, reference)
                seconds = step_seconds(model, x, steps, warmup)
                memory = saved_bytes(model, x)
                base_bytes = memory if variant == "base" else base_bytes
                rows.append(
                    {
                        "shape": f"{out_features}×{in_features}",
                        "tokens": n_tokens,
                        "variant": variant,
                        "seconds": seconds,
                        "extra_mib": (memory - base_bytes) / 2**20,
                        "layout": f"W1 {a}×{b} full, W2 {c}×{d} {w2}",
                        "auto": choose_mode(a, b, c, d, BATCH * n_tokens),
                    }
                )
                print(
                    f"{rows[-1]['shape']:>10} {n_tokens:>5} {variant:<22} {seconds * 1e3:9.2f} ms",
                    flush=True,
                )
    return rows


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    threads = torch.get_num_threads()
    return (
        f"{cpu}, {threads} threads, torch {torch.__version__}, Python {platform.python_version()}"
    )


def write_results(rows: list[dict], seconds_total: float) -> str:
    RESULTS.mkdir(exist_ok=True)
    lines = [
        "# LoKr training step on CPU: lokr_edu vs peft vs lycoris-lora",
        "",
        f"Machine: {machine()}. Whole run: {seconds_total:.0f} s. "
        "Generated by `python benchmarks/bench_lokr.py`.",
        "",
        "Each cell: median time of one training step (forward + backward + Adam) of one "
        "adapted layer, "
        "batch 2, as a ratio to the frozen base layer alone (× base) and to peft's LoKr (× peft); "
        "extra MiB = activation memory autograd keeps beyond the base layer's. Rank 8, α = 8.",
        "",
        "| shape (out×in) | tokens | LoKr layout | " + " | ".join(VARIANTS[1:]) + " | auto picks |",
        "| --- | --- | --- | " + " | ".join("---" for _ in VARIANTS[1:]) + " | --- |",
    ]
    keyed = {(r["shape"], r["tokens"], r["variant"]): r for r in rows}
    for shape, tokens in dict.fromkeys((r["shape"], r["tokens"]) for r in rows):
        base = keyed[(shape, tokens, "base")]
        peft = keyed.get((shape, tokens, "peft"))
        cells = []
        for variant in VARIANTS[1:]:
            r = keyed.get((shape, tokens, variant))
            if r is None:
                cells.append("—")
                continue
            versus_peft = f", {r['seconds'] / peft['seconds']:.2f}× peft" if peft else ""
            ratio = r["seconds"] / base["seconds"]
            cells.append(
                f"{r['seconds'] * 1e3:.1f} ms ({ratio:.2f}× base{versus_peft}; "
                f"+{r['extra_mib']:.1f} MiB)"
            )
        lines.append(
            f"| {shape} | {tokens} | {base['layout']} | "
            + " | ".join(cells)
            + f" | {base['auto']} |"
        )
    text = "\n".join(lines) + "\n"
    (RESULTS / "lokr_cpu.md").write_text(text, encoding="utf-8")
    return text


def plot(rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    largest = max(r["tokens"] for r in rows)
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    keyed = {(r["shape"], r["tokens"], r["variant"]): r for r in rows}
    fig, ax = plt.subplots(figsize=(9, 4))
    width = 0.8 / (len(VARIANTS) - 1)
    for i, variant in enumerate(VARIANTS[1:]):
        ratios = [
            keyed[(s, largest, variant)]["seconds"] / keyed[(s, largest, "base")]["seconds"]
            for s in shapes
        ]
        ax.bar([j + (i - 2.5) * width for j in range(len(shapes))], ratios, width, label=variant)
    ax.axhline(1.0, color="gray", linestyle=":")
    ax.set_xticks(range(len(shapes)), shapes)
    ax.set_xlabel("layer shape (out × in)")
    ax.set_ylabel("training step time / frozen base layer")
    ax.set_title(f"LoKr r = {RANK} training step, {largest} tokens × batch {BATCH}, CPU")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(RESULTS / "lokr_cpu.png", dpi=100)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--smoke", action="store_true", help="one small shape, one step, no files")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    print(machine())
    start = time.perf_counter()
    if args.smoke:
        run([(320, 320)], [77], steps=1, warmup=0)
        return 0
    rows = run(SHAPES, TOKENS)
    print(write_results(rows, time.perf_counter() - start))
    plot(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
