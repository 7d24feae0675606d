"""Chapter 07's DreamBooth runs on the tiny digit model: seeds, learning rates and ablations.

The chapter trains one LoKr and one LoRA live. This script runs what does not fit in a class
hour, writes every number to benchmarks/results/dreambooth_digits.json, and the chapter reads
that file:

1. learning rates: each method at each rate of LEARNING_RATES (seed 0), scored on a validation
   draw (sampling seeds that the reported numbers never use); each method keeps its own best;
2. seeds: each method at its best rate, for each variant of the prior
   (`lokr_edu.digits_sd.VARIANTS`): DreamBooth's generated class images (seeds 0-4: the
   comparison of the two methods), none, kohya's real regularisation images, class images with
   caption dropout, and class images of the concept digits only (seeds 0-2 each); with an η sweep
   for the generated prior with and without caption dropout;
3. fewer steps: each method at FEWER_STEPS, half the recipe's budget, seeds 0-2: which of the two
   learns faster.

LoKr and LoRA are compared by the course's one rule, `lokr_edu.stats.compare` (Welch's t-test
over the seeds), printed at the end.

    python benchmarks/dreambooth_digits.py            # the whole grid, ~90 min on 2 quiet cores
    python benchmarks/dreambooth_digits.py --quick    # a smoke test: two runs of three steps

Nothing is lost if it stops: each finished run is written at once to a partial file next to
--out (OUT.partial.json), and the next start continues from it (--fresh starts over); the
partial file is removed when the results are written.

Every run is seeded: the same machine gives the same numbers; another CPU may differ in the last
digits (its vector units round differently), which is why the chapter reports mean ± sd.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from lokr_edu.diffusion import eta_sweep
from lokr_edu.digits_sd import (
    CONCEPT_RECIPE,
    SAMPLING,
    VARIANTS,
    DigitReader,
    measure_concept,
    train_concept,
)
from lokr_edu.stats import compare, mean_sd

RESULTS = Path(__file__).parent / "results" / "dreambooth_digits.json"
LEARNING_RATES = {"lora": [3e-3, 5e-3, 1e-2, 2e-2], "lokr": [5e-3, 1e-2, 2e-2, 4e-2]}
FEWER_STEPS = CONCEPT_RECIPE["lora"]["steps"] // 2  # half the budget both methods share
SEEDS = [0, 1, 2]  # each ablation of the prior
COMPARISON_SEEDS = [0, 1, 2, 3, 4]  # the recipe's runs, which compare the two methods
ETAS = [0.5, 1.5]  # η = 1 is each run's own measurement
ETA_SAMPLES = 100  # per rate, at η ≠ 1
VALIDATION_SEED = 50  # sampling seed of the learning-rate choice; the reported rates use seed 2


RATES = ("concept", "preservation", "concept digits")


def score(rates: dict) -> float:
    """What the learning rate is chosen by: the concept, if preservation held (≥ 0.95)."""
    return rates["concept"] if rates["preservation"] >= 0.95 else rates["concept"] - 1


class Memo:
    """Finished runs by name, kept in a JSON file as soon as each one ends (see the docstring)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.done = json.loads(path.read_text()) if path is not None and path.exists() else {}

    def __call__(self, key: str, compute):
        if key not in self.done:
            self.done[key] = compute()
            if self.path is not None:
                temporary = self.path.with_suffix(".tmp")
                temporary.write_text(json.dumps(self.done, indent=1) + "\n")
                temporary.replace(self.path)
        return self.done[key]


def run_grid(quick: bool = False, progress=print, memo: Memo | None = None) -> dict:
    memo = memo or Memo(None)
    reader = DigitReader.fit()
    steps = 3 if quick else None  # None: the recipe's
    samples = 10 if quick else 200
    # quick: no search, each method's rate from the recipe
    rates = {
        m: [CONCEPT_RECIPE[m]["learning_rate"]] if quick else LEARNING_RATES[m]
        for m in CONCEPT_RECIPE
    }
    results: dict = {"reader": {"test": reader.test_accuracy, "rotated": reader.rotated_accuracy}}

    # 1. each method's learning rate, on the validation draw
    results["learning_rates"] = {}
    for method, grid in rates.items():
        results["learning_rates"][method] = {}
        for lr in [] if quick else grid:

            def validate(method=method, lr=lr):
                pipe, _, _ = train_concept(method, learning_rate=lr, steps=steps)
                return measure_concept(pipe, reader, samples, seed=VALIDATION_SEED)

            found = memo(f"lr {method} {lr}", validate)
            results["learning_rates"][method][str(lr)] = found
            progress(f"{method} lr {lr:g}: {found}")
    best = {
        m: float(max(found, key=lambda lr: score(found[lr]))) if found else rates[m][0]
        for m, found in results["learning_rates"].items()
    }
    results["best_learning_rate"] = best

    # 2. seeds × variants at each method's best rate
    runs = []
    plan = [(m, v, None) for m in CONCEPT_RECIPE for v in (["prior"] if quick else VARIANTS)]
    if not quick:
        plan += [(m, "prior", FEWER_STEPS) for m in CONCEPT_RECIPE]
    for method, variant, run_steps in plan:
        seeds = COMPARISON_SEEDS if (variant, run_steps) == ("prior", None) else SEEDS
        for seed in seeds[:1] if quick else seeds:

            def one_run(method=method, variant=variant, run_steps=run_steps, seed=seed) -> dict:
                start = time.perf_counter()
                pipe, losses, parameters = train_concept(
                    method,
                    variant,
                    seed=seed,
                    learning_rate=best[method],
                    steps=steps or run_steps,
                )
                seconds = time.perf_counter() - start
                run = {"method": method, "variant": variant, "seed": seed}
                run["steps"] = len(losses)
                run |= measure_concept(pipe, reader, samples)
                run |= {"train_seconds": round(seconds, 1), "parameters": parameters}
                run["final_loss"] = statistics.fmean(losses[-20:])
                if variant in ("prior", "caption dropout") and not quick and run_steps is None:
                    run["eta"] = {
                        str(eta): found
                        for eta, found in eta_sweep(
                            pipe, ETAS, lambda p: measure_concept(p, reader, ETA_SAMPLES)
                        ).items()
                    }
                    run["eta"]["1.0"] = {k: run[k] for k in RATES}
                return run

            key = f"run {method} {variant} {seed} {run_steps} {best[method]}"
            run = memo(key, one_run)
            runs.append(run)
            progress(f"{run}")
    results["runs"] = runs
    # the sum of every run's training time: runs may come from earlier, resumed invocations
    results["training_minutes"] = round(sum(r["train_seconds"] for r in runs) / 60, 1)
    results["machine"] = {
        "processor": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    results["sampling"] = SAMPLING
    return results


def summary(results: dict) -> dict:
    """{(method, variant, steps): {rate: [one value per seed]}} of the results' runs."""
    table: dict = {}
    for run in results["runs"]:
        rates = table.setdefault((run["method"], run["variant"], run["steps"]), {})
        for name in (*RATES, "train_seconds"):
            rates.setdefault(name, []).append(run[name])
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke test of a few steps")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--fresh", action="store_true", help="ignore a partial file; start over")
    parser.add_argument(
        "--threads", type=int, help="torch threads (default 2; 1 with --quick or a busy machine)"
    )
    args = parser.parse_args(argv)
    partial = args.out.with_suffix(".partial.json")
    if args.fresh:
        partial.unlink(missing_ok=True)
    # the smoke run shares the machine with make test's other worker: one thread, no contention
    torch.set_num_threads(args.threads or (1 if args.quick else 2))
    start = time.perf_counter()
    results = run_grid(args.quick, memo=None if args.quick else Memo(partial))
    minutes = round((time.perf_counter() - start) / 60, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    partial.unlink(missing_ok=True)
    table = summary(results)
    for (method, variant, steps), rates in table.items():
        cells = "  ".join(
            "{} {:.2f} ± {:.2f}".format(k, *mean_sd(values)[:2]) for k, values in rates.items()
        )
        print(f"{method:5} {variant:28} {steps:4} steps  {cells}  ({len(rates['concept'])} seeds)")
    for steps in sorted({steps for _, _, steps in table}):
        lokr, lora = (
            table.get((m, "prior", steps), {}).get("concept", []) for m in ("lokr", "lora")
        )
        if len(lokr) > 1 and len(lora) > 1:
            print(f"concept at {steps} steps, LoKr vs LoRA: {compare(lokr, lora)}")
    print(f"wrote {args.out} in {minutes} min ({results['training_minutes']} min of training)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
