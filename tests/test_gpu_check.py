"""benchmarks/gpu_check.py: its dry run on the CPU fills every row of the table with real,
finite numbers, and without a GPU the real check stops with a clear message (exit code 2)."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest

CHECK = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", CHECK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def table_rows(text: str) -> tuple[list[str], list[list[str]]]:
    lines = [line for line in text.splitlines() if line.startswith("|")]
    split = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]
    return split[0], split[2:]  # header, rows (split[1] is the --- line)


def test_dry_run_measures_every_configuration(gpu_check, tmp_path) -> None:
    out = tmp_path / "gpu_check_dry_run.md"
    # one step per configuration (no warm-up) keeps this to seconds; the default is 1 + 2
    assert gpu_check.main(["--dry-run", "--warmup", "0", "--steps", "1", "--out", str(out)]) == 0
    header, rows = table_rows(out.read_text(encoding="utf-8"))
    assert header == gpu_check.COLUMNS
    adapters = list(gpu_check.ADAPTERS)
    assert [(r[0], r[1], r[2]) for r in rows] == [
        (step, a, c) for step in ("plain", "DreamBooth") for c in ("no", "yes") for a in adapters
    ]
    column = {name: i for i, name in enumerate(header) if name != "× peft"}
    losses = {"plain": [], "DreamBooth": []}
    for r in rows:
        steps_per_s = float(r[column["steps/s"]])
        allocated = float(r[column["peak allocated (MiB)"]])
        assert steps_per_s > 0 and math.isfinite(steps_per_s)
        assert allocated > 0 and math.isfinite(allocated)
        time_ratio, memory_ratio = float(r[5]), float(r[7])
        assert math.isfinite(time_ratio) and math.isfinite(memory_ratio)
        if r[1] == gpu_check.REFERENCE:
            assert (time_ratio, memory_ratio) == (1.0, 1.0)
        assert r[8] == r[9] == "—"  # no caching allocator on the CPU
        losses[r[0]].append(float(r[column["mean loss"]]))
    # every adapter starts at ΔW = 0 and every configuration of a step draws the same noise and
    # timesteps, so the first step's loss is the frozen model's, the same in all six (to bf16
    # rounding); a DreamBooth step adds the class batch's loss (λ = 1): a larger loss
    for step in losses.values():
        assert all(math.isfinite(x) for x in step)
        assert max(step) - min(step) <= 1e-2 * abs(step[0])
    assert min(losses["DreamBooth"]) > max(losses["plain"])
    trained = {(r[1], r[2]): int(r[column["trained parameters"]].replace(",", "")) for r in rows}
    assert trained[("peft LoRA r=4", "no")] == trained[("lokr_edu LoRA r=4", "no")] > 0
    assert 0 < trained[("lokr_edu LoKr r=8", "no")] < trained[("lokr_edu LoRA r=4", "no")]


def test_without_a_gpu_it_says_so_and_exits_2(gpu_check, monkeypatch, capsys) -> None:
    monkeypatch.setattr(gpu_check.torch.cuda, "is_available", lambda: False)
    assert gpu_check.main([]) == 2
    message = capsys.readouterr().err
    assert "CUDA GPU is needed" in message and "--dry-run" in message
