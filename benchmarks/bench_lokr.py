"""LoKr training-step time and memory: lokr_edu against peft and lycoris-lora, in one run.

    python benchmarks/bench_lokr.py            # the full table; writes benchmarks/results/
    python benchmarks/bench_lokr.py --smoke    # one small shape, one step, nothing written

For each SD1.5 layer shape and token count (batch 2), one training step of a single adapted
nn.Linear: forward, backward with the input requiring grad (as inside a network), Adam step. The
variants, all at rank 8, α = 8, LyCORIS's default layout (factor = -1, W1 full, W2 low-rank unless
r ≥ max(c, d)/2) and the same factor values:

    base                  the frozen layer's own step: forward and the input's gradient only
                          (no parameter trains): the floor every adapter adds to
    lokr_edu reshape      LoKr applied as W1·X·W2ᵀ, never building W1 ⊗ W2 (lokr_edu.kron_apply)
    lokr_edu materialize  lokr_edu's LoKr forced to build ΔW = W1 ⊗ W2 and multiply by it
    lokr_edu auto         lokr_edu's default: a fixed rule (kron_apply.auto_mode) picks one
    peft                  peft's LoKr (rebuilds ΔW with torch.kron at every forward)
    lycoris               lycoris-lora's LoKr, default mode (rebuilds ΔW at every forward)
    lycoris bypass        lycoris-lora's LoKr with bypass_mode=True (applies W1·X·W2ᵀ)
    lora r=8              lokr_edu's LoRA at rank 8, for scale

Time: torch.set_num_threads(2); per shape and token count, one warm-up step of every variant,
then 5 rounds in which every variant takes one step (the order rotates between rounds, so load
from elsewhere on the machine hits all variants alike); the median of the 5 is reported, with
the fastest (min) and the interquartile range (IQR, q3 − q1) beside it. The noise floor is an A/A
pair: "lokr_edu auto" runs exactly the code of the forced mode it picks, so the two differ only
by noise; the run prints how far apart they are (`noise_floor`). It prints its own run time.
Memory: the warm-up step runs under torch.profiler(profile_memory=True), which records every
allocation and free of torch's CPU allocator during the step; the peak of the running sum is
the step's peak memory above what was allocated when it started (input, weights, optimizer
state; frees of blocks allocated before the step are not recorded, alike for every variant).
"Extra MiB" is that peak minus the base layer's: what the adapter adds at its worst moment,
transients included. Results: benchmarks/results/lokr_cpu.md and lokr_cpu.png.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

from lokr_edu.adapters import inject
from lokr_edu.kron_apply import auto_mode
from lokr_edu.lowrank import adapter_shapes, lokr_factors

RESULTS = Path(__file__).parent / "results"
# (out, in): SD1.5's attention projections at its three widths, the CLIP text encoder's MLP
# (768 -> 3072 and 3072 -> 768) and the UNet's GEGLU projection (1280 -> 10240).
SHAPES = [(320, 320), (640, 640), (1280, 1280), (3072, 768), (768, 3072), (10240, 1280)]
TOKENS = [77, 1024, 4096]
BATCH, RANK, THREADS = 2, 8, 2
STEPS = 5
VARIANTS = [
    "base",
    "lokr_edu reshape",
    "lokr_edu materialize",
    "lokr_edu auto",
    "peft",
    "lycoris",
    "lycoris bypass",
    "lora r=8",
]
REFERENCES = ["peft", "lycoris", "lycoris bypass"]
LOG: list[str] = []  # every line printed, for results/lokr_cpu_run.log


def say(line: str) -> None:
    print(line, flush=True)
    LOG.append(line)


class WithNetwork(nn.Module):
    """lycoris-lora patches the layer's forward and keeps the factors in a separate network:
    hold both, so that parameters() sees the factors and forward runs the patched layer."""

    def __init__(self, model: nn.Module, network: nn.Module) -> None:
        super().__init__()
        self.model, self.network = model, network

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def build(variant: str, out_features: int, in_features: int) -> nn.Module:
    """One adapted nn.Linear (inside an nn.Sequential, as module "0"); the base is seeded."""
    torch.manual_seed(0)
    model: nn.Module = nn.Sequential(nn.Linear(in_features, out_features))
    if variant == "base":
        return model.requires_grad_(False)
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
    return model


def lokr_values(out_features: int, in_features: int) -> dict[str, torch.Tensor]:
    """Non-zero LoKr factors in LyCORIS's layout, to copy into every implementation."""
    shapes = adapter_shapes("lokr", out_features, in_features, RANK)
    generator = torch.Generator().manual_seed(1)
    return {
        key: torch.randn(shape, generator=generator) * 0.02
        for key, shape in shapes.items()
        if key != "alpha"
    }


def copy_factors(values: dict[str, torch.Tensor], model: nn.Module) -> int:
    """Copy lokr_w1 / lokr_w2_a / ... into `model`'s parameters of those names; how many."""
    copied = 0
    with torch.no_grad():
        for name, p in model.named_parameters():
            key = name.replace(".default", "").rsplit(".", 1)[-1]
            if key in values:
                if p.shape != values[key].shape:
                    raise ValueError(f"{name} is {tuple(p.shape)}, expected {values[key].shape}")
                p.copy_(values[key])
                copied += 1
    return copied


def check_same_delta(models: dict[str, nn.Module], in_features: int) -> None:
    """All LoKr variants must compute the same ΔW·x (fp32, relative error ≤ 1e-4)."""
    x = torch.randn(1, 3, in_features)
    with torch.no_grad():
        base = models["base"](x) if "base" in models else None
        outputs = {
            v: m(x) for v, m in models.items() if "lokr" in v or v.startswith(("peft", "ly"))
        }
    if base is None or not outputs:
        return
    reference_name = next(iter(outputs))
    reference = outputs[reference_name] - base
    for v, y in outputs.items():
        error = ((y - base - reference).norm() / reference.norm()).item()
        if error > 1e-4:
            raise RuntimeError(f"{v} computes a different ΔW·x than {reference_name}: {error:.1e}")


class Runner:
    """One model, its input and its Adam optimizer; `step()` is one training step."""

    def __init__(self, model: nn.Module, x: torch.Tensor) -> None:
        self.model, self.x = model, x
        parameters = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.Adam(parameters, lr=1e-4) if parameters else None

    def step(self) -> None:
        self.x.grad = None
        self.model(self.x).sum().backward()
        if self.optimizer is not None:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)

    def timed_step(self) -> float:
        start = time.perf_counter()
        self.step()
        return time.perf_counter() - start

    def profiled_step(self) -> int:
        """Run one step under the memory profiler; its peak bytes above the start."""
        activities = [torch.profiler.ProfilerActivity.CPU]
        with torch.profiler.profile(activities=activities, profile_memory=True) as prof:
            self.step()
        events = prof.profiler.kineto_results.events()
        changes = sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]")
        return max(itertools.accumulate((n for _, n in changes), initial=0))


def variant_label(out_features: int, in_features: int) -> str:
    (a, b), (c, d) = lokr_factors(out_features, in_features)
    w2 = "full" if RANK >= max(c, d) / 2 else "low-rank"
    return f"W1 {a}×{b} full, W2 {c}×{d} {w2}"


def spread(times: list[float]) -> tuple[float, float, float]:
    """(median, min, interquartile range q3 − q1) of a variant's step times, in seconds."""
    if len(times) < 2:
        return times[0], times[0], 0.0
    q1, _, q3 = statistics.quantiles(times, n=4, method="inclusive")
    return statistics.median(times), min(times), q3 - q1


def run(shapes=SHAPES, tokens=TOKENS, steps: int = STEPS, variants=VARIANTS) -> list[dict]:
    """Time and measure every variant at every (shape, token count); one row per measurement.

    seconds is the median step, min_seconds the fastest, iqr_seconds the interquartile range."""
    rows = []
    for out_features, in_features in shapes:
        values = lokr_values(out_features, in_features)
        models = {}
        for variant in variants:
            models[variant] = build(variant, out_features, in_features)
            if variant.startswith(("lokr", "peft", "lycoris")):
                copied = copy_factors(values, models[variant])
                if copied != len(values):
                    raise RuntimeError(f"{variant}: copied {copied} of {sorted(values)}")
        check_same_delta(models, in_features)
        (a, b), (c, d) = lokr_factors(out_features, in_features)
        for n_tokens in tokens:
            x = torch.randn(BATCH, n_tokens, in_features, requires_grad=True)
            runners = {v: Runner(models[v], x) for v in variants}
            peak = {v: runners[v].profiled_step() for v in variants}  # also the warm-up
            times: dict[str, list[float]] = {v: [] for v in variants}
            for round_ in range(steps):
                shift = round_ % len(variants)
                for v in variants[shift:] + variants[:shift]:
                    times[v].append(runners[v].timed_step())
            pick = auto_mode(a, b, c, d)  # what lokr_apply(mode="auto") runs
            for v in variants:
                median, fastest, iqr = spread(times[v])
                rows.append(
                    {
                        "shape": f"{out_features}×{in_features}",
                        "tokens": n_tokens,
                        "variant": v,
                        "seconds": median,
                        "min_seconds": fastest,
                        "iqr_seconds": iqr,
                        "extra_mib": (peak[v] - peak.get("base", 0)) / 2**20,
                        "layout": variant_label(out_features, in_features),
                        "auto": pick,
                    }
                )
                say(
                    f"{rows[-1]['shape']:>10} {n_tokens:>5} {v:<21} {median * 1e3:9.2f} ms "
                    f"(min {fastest * 1e3:.2f}, IQR {iqr * 1e3:.2f}) "
                    f"{rows[-1]['extra_mib']:8.1f} MiB"
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
    return (
        f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} with "
        f"{torch.get_num_threads()} threads, Python {platform.python_version()}, "
        f"{platform.system()} {platform.release()}"
    )


def _keyed(rows: list[dict]) -> dict[tuple[str, int, str], dict]:
    return {(r["shape"], r["tokens"], r["variant"]): r for r in rows}


def noise_floor(rows: list[dict]) -> list[str]:
    """The A/A pair: "lokr_edu auto" and the forced mode it picks run the same code, so how far
    apart their medians are (the slower over the faster, − 1) is the run's noise. Two variants
    that differ by less than this are not told apart by this run."""
    keyed = _keyed(rows)
    gaps = []
    for (shape, tokens, variant), row in keyed.items():
        twin = keyed.get((shape, tokens, f"lokr_edu {row['auto']}"))
        if variant == "lokr_edu auto" and twin is not None:
            slower, faster = sorted((row["seconds"], twin["seconds"]), reverse=True)
            gaps.append((slower / faster - 1, f"{shape}/{tokens}", row["auto"]))
    if not gaps:
        return []
    gaps.sort()
    worst = gaps[-1]
    return [
        f"- noise floor (A/A: lokr_edu auto against the forced mode it picks, the same code): "
        f"their medians differ by {statistics.median(g for g, *_ in gaps):.1%} at the median of "
        f"{len(gaps)} shapes × token counts, by up to {worst[0]:.1%} ({worst[1]}, "
        f"auto = {worst[2]}); differences below that are noise"
    ]


def checks(rows: list[dict]) -> list[str]:
    """The targets for lokr_edu's default (auto), each with its numbers, PASS / FAIL."""
    keyed = _keyed(rows)
    ours = "lokr_edu auto"
    lines = []
    key = ("1280×1280", 4096)
    if all((*key, v) in keyed for v in [ours, *REFERENCES, "lora r=8"]):
        t = {v: keyed[(*key, v)]["seconds"] for v in [ours, *REFERENCES, "lora r=8"]}
        bounds = [("peft", 0.55), ("lycoris", 0.55), ("lycoris bypass", 1.0), ("lora r=8", 1.15)]
        for ref, bound in bounds:
            ratio = t[ours] / t[ref]
            ok = "PASS" if ratio <= bound else "FAIL"
            lines.append(f"- {ok}: 1280×1280, 4096 tokens: {ratio:.2f}× {ref} (target ≤ {bound})")
    groups = list(dict.fromkeys((r["shape"], r["tokens"]) for r in rows))
    slower, heavier, materialize_wins, wrong_pick = [], [], [], []
    for shape, tokens in groups:
        row = {v: keyed.get((shape, tokens, v)) for v in VARIANTS}
        if row[ours] is None:
            continue
        if row["peft"] and row[ours]["seconds"] > row["peft"]["seconds"]:
            slower.append(f"{shape}/{tokens}")
        for ref in REFERENCES:
            if row[ref] and row[ours]["extra_mib"] >= row[ref]["extra_mib"]:
                heavier.append(f"{shape}/{tokens} vs {ref}")
        forced = {m: row[f"lokr_edu {m}"] for m in ("reshape", "materialize")}
        if all(forced.values()):
            faster = min(forced, key=lambda m: forced[m]["seconds"])
            margin = max(f["seconds"] for f in forced.values()) / forced[faster]["seconds"]
            if faster == "materialize":
                materialize_wins.append(f"{shape}/{tokens}")
            if faster != row[ours]["auto"] and margin > 1.10:
                wrong_pick.append(f"{shape}/{tokens} ({faster} {margin:.2f}× faster)")
    n = len(groups)
    lines += [
        f"- {'FAIL' if slower else 'PASS'}: lokr_edu no slower than peft at {n - len(slower)} of "
        f"{n} shapes × token counts" + (f"; slower at {slower}" if slower else ""),
        f"- {'FAIL' if heavier else 'PASS'}: lokr_edu's peak memory above the base below peft's, "
        f"lycoris's and lycoris bypass's at {n - len({h.split(' vs')[0] for h in heavier})} of {n}"
        + (f"; not below at {heavier}" if heavier else ""),
        f"- {'FAIL' if wrong_pick else 'PASS'}: forced materialize was faster at "
        f"{len(materialize_wins)} of {n}"
        + (f" {materialize_wins}" if materialize_wins else "")
        + "; auto picked the faster mode "
        f"(or one within 10%) at {n - len(wrong_pick)} of {n}"
        + (f"; not at {wrong_pick}" if wrong_pick else ""),
    ]
    return lines


def _ms(row: dict) -> str:
    """A time cell: the median in ms, the min and the interquartile range beside it."""
    return (
        f"{row['seconds'] * 1e3:.1f} (min {row['min_seconds'] * 1e3:.1f}, "
        f"IQR {row['iqr_seconds'] * 1e3:.1f})"
    )


def write_results(rows: list[dict], seconds_total: float) -> str:
    RESULTS.mkdir(exist_ok=True)
    keyed = _keyed(rows)
    shown = [v for v in VARIANTS if v != "base"]
    lines = [
        "# LoKr training step on CPU: lokr_edu vs peft vs lycoris-lora",
        "",
        f"Machine: {machine()}. Whole run: {seconds_total:.0f} s. "
        "Generated by `python benchmarks/bench_lokr.py` (method: benchmarks/README.md).",
        "",
        "One training step (forward + backward with the input requiring grad + Adam) of one "
        "adapted nn.Linear, batch 2, rank 8, α = 8, the same LoKr factor values everywhere. "
        f"Each cell: the median of {STEPS} steps in ms, with the fastest (min) and the "
        "interquartile range (IQR) beside it, then the ratio of the medians to the frozen base "
        "layer's own step and to peft's LoKr. `base` is that frozen step: the layer's forward "
        "and its input's gradient, no parameter trained; it is the floor. `auto` is the mode "
        "lokr_edu's default rule (`auto_mode`) picks.",
        "",
        "## Time",
        "",
        "| shape (out×in) | tokens | LoKr layout | base (frozen, ∇x only) | "
        + " | ".join(shown)
        + " | auto picks |",
        "| --- | --- | --- | --- | " + " | ".join("---" for _ in shown) + " | --- |",
    ]
    groups = list(dict.fromkeys((r["shape"], r["tokens"]) for r in rows))
    for shape, tokens in groups:
        base = keyed[(shape, tokens, "base")]
        peft = keyed.get((shape, tokens, "peft"))
        cells = []
        for v in shown:
            r = keyed.get((shape, tokens, v))
            if r is None:
                cells.append("—")
                continue
            versus_peft = f", {r['seconds'] / peft['seconds']:.2f}× peft" if peft else ""
            cells.append(f"{_ms(r)} ({r['seconds'] / base['seconds']:.2f}× base{versus_peft})")
        lines.append(
            f"| {shape} | {tokens} | {base['layout']} | {_ms(base)} | "
            + " | ".join(cells)
            + f" | {base['auto']} |"
        )
    lines += [
        "",
        "## Peak memory above the frozen base (MiB)",
        "",
        "Peak of torch's CPU allocations during one step, minus the base layer's peak "
        "(transients included; the input, weights and optimizer state exist before the step).",
        "",
        "| shape (out×in) | tokens | " + " | ".join(shown) + " |",
        "| --- | --- | " + " | ".join("---" for _ in shown) + " |",
    ]
    for shape, tokens in groups:
        cells = [
            f"{keyed[(shape, tokens, v)]['extra_mib']:.1f}" if (shape, tokens, v) in keyed else "—"
            for v in shown
        ]
        lines.append(f"| {shape} | {tokens} | " + " | ".join(cells) + " |")
    lines += ["", "## Noise floor", "", *noise_floor(rows)]
    lines += ["", "## Targets", "", *checks(rows)]
    text = "\n".join(lines) + "\n"
    (RESULTS / "lokr_cpu.md").write_text(text, encoding="utf-8")
    log = "\n".join([*LOG, *noise_floor(rows), *checks(rows)]) + "\n"
    (RESULTS / "lokr_cpu_run.log").write_text(log, encoding="utf-8")
    return text


def plot(rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keyed = _keyed(rows)
    tokens = sorted({r["tokens"] for r in rows})
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    shown = [v for v in VARIANTS if v != "base"]
    fig, axes = plt.subplots(len(tokens), 1, figsize=(10, 3.2 * len(tokens)), squeeze=False)
    width = 0.8 / len(shown)
    for ax, n_tokens in zip(axes[:, 0], tokens, strict=True):
        for i, v in enumerate(shown):
            ratios = [
                keyed[(s, n_tokens, v)]["seconds"] / keyed[(s, n_tokens, "base")]["seconds"]
                for s in shapes
            ]
            offsets = [j + (i - (len(shown) - 1) / 2) * width for j in range(len(shapes))]
            ax.bar(offsets, ratios, width, label=v)
        ax.axhline(1.0, color="gray", linestyle=":", linewidth=1)
        ax.set_xticks(range(len(shapes)), shapes)
        ax.set_ylabel("step time / frozen base")
        ax.set_title(f"{n_tokens} tokens × batch {BATCH}")
    axes[-1, 0].set_xlabel("layer shape (out × in)")
    axes[0, 0].legend(fontsize=7, ncol=4)
    fig.suptitle(f"LoKr r = {RANK} training step on CPU ({THREADS} threads), lower is better")
    fig.tight_layout()
    fig.savefig(RESULTS / "lokr_cpu.png", dpi=100)
    plt.close(fig)


def _shape(text: str) -> tuple[int, int]:
    out_features, in_features = text.lower().replace("×", "x").split("x")
    return int(out_features), int(in_features)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--smoke", action="store_true", help="one small shape, one step, no files")
    parser.add_argument(
        "--shapes", nargs="+", type=_shape, default=SHAPES, help="OUTxIN, e.g. 1280x1280"
    )
    parser.add_argument("--tokens", nargs="+", type=int, default=TOKENS)
    args = parser.parse_args(argv)
    torch.set_num_threads(THREADS)
    say(machine())
    start = time.perf_counter()
    if args.smoke:
        rows = run([(320, 320)], [77], steps=1)
        for line in noise_floor(rows):
            say(line)
        say(f"Whole run: {time.perf_counter() - start:.1f} s")
        return 0
    rows = run(args.shapes, args.tokens)
    for line in noise_floor(rows):
        say(line)
    seconds_total = time.perf_counter() - start
    say(f"Whole run: {seconds_total:.0f} s")
    print(write_results(rows, seconds_total))
    plot(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
