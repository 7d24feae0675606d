"""Smoke test of benchmarks/bench_lokr.py: one tiny configuration, rows well-formed, no timings."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_lokr.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_lokr", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_one_tiny_configuration_gives_well_formed_rows(bench) -> None:
    rows = bench.run(shapes=[(24, 20)], tokens=[3], steps=1)
    assert [r["variant"] for r in rows] == bench.VARIANTS
    for r in rows:
        assert set(r) == {
            *("shape", "tokens", "variant", "seconds", "min_seconds", "iqr_seconds"),
            *("extra_mib", "layout", "auto"),
        }
        assert (r["shape"], r["tokens"]) == ("24×20", 3)
        assert r["seconds"] > 0 and math.isfinite(r["seconds"])
        assert r["min_seconds"] == r["seconds"] and r["iqr_seconds"] == 0.0  # one step
        assert math.isfinite(r["extra_mib"])
        assert r["auto"] in ("reshape", "materialize")
        assert r["layout"] == "W1 4×4 full, W2 6×5 full"  # r = 8 ≥ max(6, 5)/2: W2 full
    assert rows[0]["extra_mib"] == 0.0  # the base is the reference


def synthetic_rows(bench, seconds: dict[str, float], mib: dict[str, float]) -> list[dict]:
    """One 1280×1280, 4096-token group with the given times and memory per variant."""
    return [
        {
            "shape": "1280×1280",
            "tokens": 4096,
            "variant": v,
            "seconds": seconds[v],
            "min_seconds": seconds[v],
            "iqr_seconds": 0.0,
            "extra_mib": mib[v],
            "layout": "",
            "auto": "reshape",
        }
        for v in bench.VARIANTS
    ]


def test_checks_pass_and_fail_on_the_numbers(bench) -> None:
    """The targets are computed from the rows: a run that meets them passes every line, and a
    run where lokr_edu is slower than peft and heavier than lycoris fails exactly those."""
    seconds = dict.fromkeys(bench.VARIANTS, 1.0)
    seconds |= {"lokr_edu auto": 0.5, "lokr_edu reshape": 0.5, "lokr_edu materialize": 0.9}
    mib = dict.fromkeys(bench.VARIANTS, 100.0) | {"lokr_edu auto": 10.0, "base": 0.0}
    good = bench.checks(synthetic_rows(bench, seconds, mib))
    assert len(good) == 7 and all(line.startswith("- PASS") for line in good), good

    seconds["lokr_edu auto"] = 1.2  # slower than peft (1.0)
    mib["lokr_edu auto"] = 100.0  # not below the references
    bad = bench.checks(synthetic_rows(bench, seconds, mib))
    failed = [line for line in bad if line.startswith("- FAIL")]
    assert any("1.20× peft (target ≤ 0.55)" in line for line in failed)
    assert any("no slower than peft at 0 of 1" in line for line in failed)
    assert any("peak memory" in line and "not below" in line for line in failed)
    assert not any("auto picked" in line for line in failed)  # auto still names the faster mode


def test_machine_line_names_cpu_threads_and_torch(bench) -> None:
    line = bench.machine()
    assert "threads" in line and "torch" in line and "cores" in line


def test_spread_is_the_median_the_min_and_the_interquartile_range(bench) -> None:
    median, fastest, iqr = bench.spread([5.0, 1.0, 3.0, 2.0, 4.0])
    assert (median, fastest) == (3.0, 1.0)
    assert iqr == 2.0  # quartiles of 1..5 (inclusive): 2 and 4


def test_the_noise_floor_is_the_gap_between_auto_and_the_mode_it_runs(bench) -> None:
    """auto runs the code of the mode it picks (reshape here): an A/A pair, whatever the others."""
    seconds = dict.fromkeys(bench.VARIANTS, 1.0)
    seconds |= {"lokr_edu auto": 1.21, "lokr_edu reshape": 1.0, "lokr_edu materialize": 3.0}
    rows = synthetic_rows(bench, seconds, dict.fromkeys(bench.VARIANTS, 0.0))
    (line,) = bench.noise_floor(rows)
    assert "by up to 21.0% (1280×1280/4096, auto = reshape)" in line
    assert "differ by 21.0% at the median of 1 shapes" in line
    assert bench.noise_floor([r for r in rows if r["variant"] != "lokr_edu reshape"]) == []


def test_the_results_show_the_spread_the_floor_and_the_frozen_step(bench, tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "RESULTS", tmp_path)
    seconds = dict.fromkeys(bench.VARIANTS, 1.0) | {"base": 0.5}
    rows = synthetic_rows(bench, seconds, dict.fromkeys(bench.VARIANTS, 0.0))
    text = bench.write_results(rows, 12.0)
    assert "Whole run: 12 s" in text
    assert "| base (frozen, ∇x only) |" in text
    assert "| 500.0 (min 500.0, IQR 0.0) | 1000.0 (min 1000.0, IQR 0.0) (2.00× base" in text
    assert "## Noise floor" in text and "A/A" in text
