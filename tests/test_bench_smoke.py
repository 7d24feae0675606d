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
        assert set(r) == {"shape", "tokens", "variant", "seconds", "extra_mib", "layout", "auto"}
        assert (r["shape"], r["tokens"]) == ("24×20", 3)
        assert r["seconds"] > 0 and math.isfinite(r["seconds"])
        assert math.isfinite(r["extra_mib"])
        assert r["auto"] in ("reshape", "materialize")
        assert r["layout"] == "W1 4×4 full, W2 6×5 full"  # r = 8 ≥ max(6, 5)/2: W2 full
    assert rows[0]["extra_mib"] == 0.0  # the base is the reference
    lines = bench.checks(rows)
    assert lines and all(line.startswith(("- PASS", "- FAIL")) for line in lines)


def test_machine_line_names_cpu_threads_and_torch(bench) -> None:
    line = bench.machine()
    assert "threads" in line and "torch" in line and "cores" in line
