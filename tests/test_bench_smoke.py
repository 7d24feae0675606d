"""The LoKr benchmark runs end to end on one small shape (timings are not checked: tests check
correctness; benchmarks/results/ holds the measured table)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_lokr.py"


def load_benchmark():
    spec = importlib.util.spec_from_file_location("bench_lokr", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_one_shape_one_step_gives_a_row_per_variant(capsys) -> None:
    bench = load_benchmark()
    rows = bench.run([(320, 320)], [77], steps=1, warmup=0)
    assert [r["variant"] for r in rows] == bench.VARIANTS
    for row in rows:
        assert row["shape"] == "320×320" and row["tokens"] == 77
        assert row["seconds"] > 0
        assert row["auto"] in ("reshape", "materialize")
    extra = {r["variant"]: r["extra_mib"] for r in rows}
    assert extra["base"] == 0
    # the reshape path keeps no more activation memory than the references
    assert extra["lokr_edu reshape"] <= min(
        extra["peft"], extra["lycoris"], extra["lycoris bypass"]
    )
    assert "320×320" in capsys.readouterr().out
