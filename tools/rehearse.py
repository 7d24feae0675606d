"""Rehearse the course's GPU path on the CPU, at SD1.5's full size: `make rehearse`.

Nothing is downloaded: SD1.5 is built from its published configs with random weights
(`lokr_edu.sd15.save_random_pipeline`, bf16, saved once and read by every stage). Stages:

    a  python -m lokr_edu.train on that folder, DreamBooth with prior preservation (class
       images drawn by the pipeline at 64 px before the first run, reused by every later one),
       LoKr r8 and LoRA r4, --mixed-precision bf16 --gradient-checkpointing, 64 px, 4 steps,
       checkpoints (each exporting the adapter), log.csv and samples; each run once straight,
       once killed (SIGKILL) after its step-2 checkpoint and resumed with --resume; the resumed
       checkpoint, exports and log must equal the straight run's bit for bit.
    b  a fresh pipeline loads each exported adapter (LoRA: diffusers' pipe.load_lora_weights;
       LoKr: lokr_edu.load_adapter) and draws the training run's last sample grid again (same
       seed, `lokr_edu.diffusion.sample_grid`): equal within RELOAD_TOLERANCE, while the
       base model's grid differs from it by more.
    c  chapter 08 (your own concept on SD1.5) on that folder, on the CPU, through its LOKR_EDU_*
       environment variables (64 px, bf16, 2 steps, 2 class images, a checkpoint every step; a
       small captioned image folder is written for it): it must run SD1.5, not its stand-in,
       every cell must run, and the runs must leave their files (class images, log.csv, each
       checkpoint's export, sample grids).
    d  the README's multi-GPU command with two CPU processes (gloo) on the tiny model of
       chapter 07: the loss falls, the checkpoint and export are written once, by the main
       process, and the adapter matches a single-process run at the same global batch.

Every stage runs in child processes; it prints each stage's wall time and peak memory (the
largest sum of resident memory over its process tree, sampled every 0.2 s). Not part of
`make test`: on the course's 2-core machine it takes about a quarter of an hour.

    python tools/rehearse.py [--work DIR] [--stages abcd]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
STEPS, RESOLUTION, PROMPT, TRIGGER = 4, 64, "a photo of sks dog", "sks"
CLASS_PROMPT, CLASS_IMAGES = "a photo of a dog", 2  # stage a's DreamBooth prior
# Pixel differences allowed between the run's last grid and the reloaded adapter's (8-bit
# images in [0, 1]): the run drew its grid with the factors in fp32 (training), the exported file
# holds them in bf16 (the pipeline's dtype after training), and at full size that moves a few
# pixels by a few levels (the first full-size rehearsal measured a largest 7/255, a mean 0.9/255).
# The base model's grid must differ at least RELOAD_MARGIN times more on average: the reloaded
# adapter is really the trained one.
RELOAD_TOLERANCE = 8 / 255  # largest |Δ|
RELOAD_MEAN_TOLERANCE = 2 / 255  # mean |Δ|
RELOAD_MARGIN = 5
DDP_TOLERANCE = 1e-5  # largest |Δ| between the 2-process and the 1-process adapter (fp32)


@dataclass
class Stage:
    name: str
    ok: bool = True
    lines: list[str] = field(default_factory=list)
    seconds: float = 0.0
    cpu: float = 0.0  # user + system seconds of its processes (all cores)
    peak: int = 0  # bytes

    def check(self, condition: bool, message: str) -> None:
        self.ok &= bool(condition)
        self.lines.append(f"{'ok  ' if condition else 'FAIL'} {message}")


def _tree_rss(process) -> int:
    import psutil

    total = 0
    try:
        for p in [process, *process.children(recursive=True)]:
            try:
                total += p.memory_info().rss
            except psutil.Error:
                pass
    except psutil.Error:
        pass
    return total


def run(stage: Stage, command: list[str], log: Path, *, env=None, kill_when=None, timeout=900):
    """Run `command` (output to `log`), adding its time and peak memory to `stage`.

    kill_when: a function polled every 0.2 s; when it returns True the process group is killed
    (SIGKILL, as an out-of-memory kill or a pulled plug would). Returns the exit status."""
    import psutil

    start, used = time.perf_counter(), _children_cpu()
    with open(log, "w") as out:
        process = subprocess.Popen(
            command,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=REPO,
            env={**os.environ, **(env or {})},
            start_new_session=True,
        )
        watched = psutil.Process(process.pid)
        while process.poll() is None:
            stage.peak = max(stage.peak, _tree_rss(watched))
            if kill_when is not None and kill_when():
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
                break
            if time.perf_counter() - start > timeout:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
                stage.check(False, f"{' '.join(command[:4])}… timed out after {timeout} s")
                break
            time.sleep(0.2)
    stage.seconds += time.perf_counter() - start
    stage.cpu += _children_cpu() - used
    return process.returncode


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def tail(log: Path, lines: int = 3) -> str:
    text = log.read_text(errors="replace").replace("\r", "\n").strip().splitlines()
    return " | ".join(text[-lines:])


def write_images(folder: Path, count: int, captions: list[str]) -> Path:
    """`count` small non-square random-colour images with captions (the crop is exercised)."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        width, height = [(96, 72), (72, 96), (80, 80), (120, 64)][i % 4]
        pixels = (rng.random((height, width, 3)) * 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"image{i}.png")
        (folder / f"image{i}.txt").write_text(captions[i % len(captions)] + "\n")
    return folder


def write_digits(folder: Path, count: int = 16) -> Path:
    """Rotated digits (8×8) with chapter 07's captions, for the tiny model."""
    import numpy as np
    from PIL import Image

    from lokr_edu.digits_sd import caption, digit_images

    folder.mkdir(parents=True, exist_ok=True)
    images, labels = digit_images(rotated=True)
    for i in range(count):
        grey = ((images[i, 0].numpy() + 1) * 127.5).round().astype(np.uint8)
        Image.fromarray(grey).convert("RGB").save(folder / f"digit{i:02d}.png")
        (folder / f"digit{i:02d}.txt").write_text(caption(int(labels[i]), rotated=True))
    return folder


def checkpoint_step(path: Path) -> int:
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            return int(f.metadata()["step"])
    except Exception:  # not there yet, or being replaced
        return 0


def same_tensors(a: Path, b: Path, tolerance: float = 0.0) -> tuple[bool, float]:
    """(every tensor equal within tolerance — 0: bit for bit, largest |Δ|)."""
    from safetensors.torch import load_file

    x, y = load_file(str(a)), load_file(str(b))
    if x.keys() != y.keys():
        return False, float("inf")
    largest = max(float((x[k].float() - y[k].float()).abs().max()) for k in x)
    exact = all(x[k].dtype == y[k].dtype and bool((x[k] == y[k]).all()) for k in x)
    return (exact if tolerance == 0 else largest <= tolerance), largest


# ---------------------------------------------------------------------------------------------
# stages
# ---------------------------------------------------------------------------------------------


def stage_build(work: Path) -> tuple[Stage, Path]:
    stage, model = Stage("build: random full-size SD1.5, saved"), work / "sd15"
    if (model / "model_index.json").is_file():
        stage.check(True, f"reused {model}")
        return stage, model
    code = (
        "import torch; from lokr_edu.sd15 import save_random_pipeline; "
        f"save_random_pipeline({str(model)!r}, dtype=torch.bfloat16)"
    )
    status = run(stage, [PYTHON, "-c", code], work / "build.log")
    stage.check(status == 0, f"save_random_pipeline -> {model} ({tail(work / 'build.log', 1)})")
    return stage, model


def train_command(
    model: Path, data: Path, output: Path, method: str, classes: Path, *extra: str
) -> list[str]:
    rank = {"lokr": "8", "lora": "4"}[method]
    return [
        *(PYTHON, "-m", "lokr_edu.train", "--model", str(model), "--data", str(data)),
        *("--output", str(output), "--method", method, "--rank", rank),
        *("--resolution", str(RESOLUTION), "--batch-size", "1", "--steps", str(STEPS)),
        *("--learning-rate", "1e-2", "--checkpoint-every", "2", "--random-flip"),
        *("--mixed-precision", "bf16", "--gradient-checkpointing"),
        *("--sample-every", str(STEPS), "--sample-prompt", PROMPT),
        *("--sample-inference-steps", "2", "--seed", "0"),
        *("--with-prior-preservation", "--class-prompt", CLASS_PROMPT),
        *("--class-data", str(classes), "--num-class-images", str(CLASS_IMAGES)),
        *extra,
    ]


def class_images(folder: Path) -> dict[str, int]:
    """{file name: modification time in ns} of the class images in folder."""
    return {p.name: p.stat().st_mtime_ns for p in sorted(folder.glob("*.png"))}


def stage_train(work: Path, model: Path) -> Stage:
    stage = Stage("a: DreamBooth, LoKr and LoRA (bf16, checkpointing), kill, resume")
    data = write_images(work / "data", 8, [f"a photo of {TRIGGER} dog", f"a {TRIGGER} cat"])
    classes = work / "class_images"
    drawn: dict[str, int] = {}
    for method in ("lokr", "lora"):
        straight, parts = work / "runs" / method / "straight", work / "runs" / method / "resumed"
        command = train_command(model, data, straight, method, classes)
        status = run(stage, command, work / f"{method}.log")
        stage.check(
            status == 0, f"{method}: {STEPS} steps straight ({tail(work / f'{method}.log', 2)})"
        )
        if not drawn:  # the first run drew the class images; every later run must reuse them
            drawn = class_images(classes)
            stage.check(
                len(drawn) == CLASS_IMAGES,
                f"{len(drawn)} class images drawn by the pipeline for {CLASS_PROMPT!r}",
            )
        checkpoint = parts / "checkpoint.safetensors"
        status = run(
            stage,
            train_command(model, data, parts, method, classes),
            work / f"{method}.killed.log",
            kill_when=lambda c=checkpoint: checkpoint_step(c) >= 2,
        )
        killed_at = checkpoint_step(checkpoint)
        stage.check(
            status == -signal.SIGKILL and 2 <= killed_at < STEPS,
            f"{method}: killed (status {status}) after its step-{killed_at} checkpoint",
        )
        log = work / f"{method}.resumed.log"
        status = run(stage, train_command(model, data, parts, method, classes, "--resume"), log)
        stage.check(status == 0, f"{method}: resumed to step {STEPS} ({tail(log, 1)})")
        files = ["checkpoint.safetensors", "adapter.safetensors"]
        files += ["pytorch_lora_weights.safetensors"] if method == "lora" else []
        files += [f"checkpoints/step_{step:06d}/adapter.safetensors" for step in (2, STEPS)]
        for name in files:
            exists = (straight / name).is_file() and (parts / name).is_file()
            equal, largest = same_tensors(straight / name, parts / name) if exists else (False, -1)
            stage.check(
                equal, f"{method}: resumed {name} == straight, bit for bit (max |Δ| {largest:g})"
            )
        logs = [(folder / "log.csv").read_text() for folder in (straight, parts)]
        rows = logs[0].splitlines()[1:]
        stage.check(
            logs[0] == logs[1] and len(rows) == STEPS and all(r.split(",")[3] for r in rows),
            f"{method}: log.csv of the resumed run == straight, {len(rows)} rows with a prior loss",
        )
        sample = straight / "samples" / f"step_{STEPS:06d}.png"
        stage.check(sample.is_file(), f"{method}: sample grid {sample.relative_to(work)}")
    stage.check(
        class_images(classes) == drawn, f"the {len(drawn)} class images reused by all 6 runs"
    )
    return stage


RELOAD = """
import json, sys, numpy as np, torch
from PIL import Image
from lokr_edu import load_adapter
from lokr_edu.diffusion import TrainConfig, load_pipeline, sample_grid
model, run, method, prompt, steps, side = sys.argv[1:7]
config = TrainConfig(sample_prompts=(prompt,), sample_inference_steps=2, seed=0,
                     sample_resolution=int(side))
autocast = torch.autocast("cpu", dtype=torch.bfloat16)  # what accelerate's bf16 autocast is
pipe = load_pipeline(model, dtype=torch.bfloat16)
base = np.asarray(sample_grid(pipe, config, autocast=autocast), dtype=np.float32) / 255
if method == "lora":
    pipe.load_lora_weights(run)  # diffusers reads pytorch_lora_weights.safetensors
else:
    load_adapter(pipe, run + "/adapter.safetensors")
again = np.asarray(sample_grid(pipe, config, autocast=autocast), dtype=np.float32) / 255
trained = np.asarray(Image.open(f"{run}/samples/step_{int(steps):06d}.png"), dtype=np.float32)
trained /= 255
print(json.dumps({"reloaded": float(np.abs(again - trained).max()),
                  "base": float(np.abs(base - trained).max()),
                  "reloaded_mean": float(np.abs(again - trained).mean()),
                  "base_mean": float(np.abs(base - trained).mean())}))
"""


def stage_reload(work: Path, model: Path) -> Stage:
    stage = Stage("b: exported adapters in a fresh pipeline draw the trained images")
    for method in ("lokr", "lora"):
        run_dir, log = work / "runs" / method / "straight", work / f"{method}.reload.log"
        loader = "pipe.load_lora_weights" if method == "lora" else "lokr_edu.load_adapter"
        command = [PYTHON, "-c", RELOAD, str(model), str(run_dir), method, PROMPT, str(STEPS)]
        status = run(stage, [*command, str(RESOLUTION)], log)
        try:
            result = json.loads(log.read_text().strip().splitlines()[-1])
        except (ValueError, IndexError):
            stage.check(False, f"{method}: {loader} failed (status {status}: {tail(log)})")
            continue
        stage.check(
            result["reloaded"] <= RELOAD_TOLERANCE
            and result["reloaded_mean"] <= RELOAD_MEAN_TOLERANCE
            and result["base_mean"] > RELOAD_MARGIN * result["reloaded_mean"],
            f"{method} via {loader}: |Δ| to the trained grid: largest {result['reloaded']:.4f} "
            f"(≤ {RELOAD_TOLERANCE:.4f}), mean {result['reloaded_mean']:.5f} "
            f"(≤ {RELOAD_MEAN_TOLERANCE:.4f}); base model: largest {result['base']:.4f}, mean "
            f"{result['base_mean']:.5f} (> {RELOAD_MARGIN}× the reloaded mean)",
        )
    return stage


NOTEBOOK = REPO / "notebooks" / "08_your_own_concept.ipynb"
NOTEBOOK_STEPS, NOTEBOOK_CLASS_IMAGES = 2, 2


def stage_notebook(work: Path, model: Path, notebook: Path = NOTEBOOK) -> Stage:
    import nbformat

    stage = Stage("c: chapter 08 on SD1.5 (your own concept) on the CPU")
    data = write_images(work / "ch08_data", 4, [f"a photo of {TRIGGER} dog"])
    runs = work / "ch08_runs"
    env = {
        "LOKR_EDU_SD15": str(model),
        "LOKR_EDU_INSTANCE_DATA": str(data),
        "LOKR_EDU_TRIGGER": TRIGGER,
        "LOKR_EDU_CLASS_PROMPT": "a photo of a dog",
        "LOKR_EDU_PROMPTS": f"a photo of {TRIGGER} dog|a painting of {TRIGGER} dog",
        "LOKR_EDU_CLASS_IMAGES": str(NOTEBOOK_CLASS_IMAGES),
        "LOKR_EDU_METHODS": "lokr,lora",
        "LOKR_EDU_DEVICE": "cpu",
        "LOKR_EDU_MIXED_PRECISION": "bf16",
        "LOKR_EDU_RESOLUTION": str(RESOLUTION),
        "LOKR_EDU_STEPS": str(NOTEBOOK_STEPS),
        "LOKR_EDU_CHECKPOINT_EVERY": "1",
        "LOKR_EDU_SAMPLE_STEPS": "2",
        "LOKR_EDU_OUTPUT": str(runs),
    }
    out, log = work / "course", work / "ch08.log"
    command = [PYTHON, "-m", "lokr_edu.course", "run", "--out", str(out), str(notebook)]
    status = run(stage, command, log, env=env, timeout=1800)
    executed = out / "notebooks" / notebook.name
    if status != 0 or not executed.is_file():
        stage.check(False, f"{notebook} did not run to the end (status {status}): {tail(log, 2)}")
        return stage
    nb = nbformat.read(executed, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    ran = [c for c in code if c.get("execution_count") is not None]
    errors = [c for c in code for o in c.get("outputs", []) if o.get("output_type") == "error"]
    stage.check(
        len(ran) == len(code) and not errors,
        f"{len(ran)}/{len(code)} code cells ran, {len(errors)} with an error ({executed})",
    )
    first = "".join(o.get("text", "") for o in code[0].get("outputs", [])).splitlines()
    stage.check(
        bool(first) and first[0].startswith("model: Stable Diffusion 1.5"),
        f"it ran SD1.5, not the stand-in: {first[0] if first else 'no output'!r}",
    )
    classes = sorted((runs / "class_images").glob("*.png")) if runs.is_dir() else []
    stage.check(
        len(classes) == NOTEBOOK_CLASS_IMAGES,
        f"{len(classes)} class images in {runs / 'class_images'}",
    )
    for method in ("lokr", "lora"):
        folder = runs / method
        files = ["log.csv"] + [
            f"{kind}/step_{step:06d}{name}"
            for step in range(1, NOTEBOOK_STEPS + 1)
            for kind, name in (("checkpoints", "/adapter.safetensors"), ("samples", ".png"))
        ]
        if method == "lora":  # and diffusers' file
            files.append(f"checkpoints/step_{NOTEBOOK_STEPS:06d}/pytorch_lora_weights.safetensors")
        missing = [name for name in files if not (folder / name).is_file()]
        stage.check(
            not missing,
            f"{method}: {len(files) - len(missing)}/{len(files)} files in "
            f"{folder} (log.csv, each checkpoint's export and sample grid){missing or ''}",
        )
    return stage


HELD_OUT_LOSS = """
import json, sys, torch
from lokr_edu import load_adapter
from lokr_edu.diffusion import (ImageCaptionFolder, load_pipeline, noise_prediction_loss,
                                tokenize_captions)
model, data, run = sys.argv[1:4]
pipe = load_pipeline(model)
dataset = ImageCaptionFolder(data, 8, center_crop=True)
pixels = torch.stack([dataset[i][0] for i in range(len(dataset))])
ids = tokenize_captions(pipe.tokenizer, dataset.captions)

@torch.no_grad()
def mean_loss(draws=16):
    text = pipe.text_encoder(ids)[0]
    total = 0.0
    for k in range(draws):
        g = torch.Generator().manual_seed(k)
        z = pipe.vae.encode(pixels).latent_dist.sample(g) * pipe.vae.config.scaling_factor
        total += float(noise_prediction_loss(pipe.unet, z, text, pipe.scheduler, g))
    return total / draws

before = mean_loss()
load_adapter(pipe, run + "/adapter.safetensors")
print(json.dumps({"before": before, "after": mean_loss(), "draws": 16 * len(dataset)}))
"""


def stage_multiprocess(work: Path) -> Stage:
    from lokr_edu.digits_sd import TINY_MODEL

    stage = Stage("d: accelerate launch, 2 CPU processes (gloo) vs 1, tiny model")
    data = write_digits(work / "digits")
    steps = "12"
    common = [
        *("-m", "lokr_edu.train", "--model", str(TINY_MODEL), "--data", str(data)),
        *("--method", "lokr", "--rank", "4", "--resolution", "8", "--batch-size", "4"),
        *("--steps", steps, "--learning-rate", "1e-2", "--checkpoint-every", "4", "--seed", "0"),
    ]
    port = str(29500 + os.getpid() % 1000)
    launch = [
        *(PYTHON, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"),
        *("--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"),
        *("--main_process_port", port),
    ]
    two, one = work / "ddp" / "two", work / "ddp" / "one"
    # ACCELERATE_USE_CPU: the processes join with gloo on the CPU (no CUDA here)
    status = run(
        stage,
        [*launch, *common, "--output", str(two), "--gradient-accumulation-steps", "1"],
        work / "ddp.two.log",
        env={"ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"},
    )
    log = (work / "ddp.two.log").read_text(errors="replace")
    stage.check(status == 0, f"2 processes × batch 4: {tail(work / 'ddp.two.log', 1)}")
    status = run(
        stage,
        [PYTHON, *common, "--output", str(one), "--gradient-accumulation-steps", "2"],
        work / "ddp.one.log",
    )
    stage.check(
        status == 0, f"1 process × batch 4 × 2 accumulated: {tail(work / 'ddp.one.log', 1)}"
    )
    wrote = [line for line in log.splitlines() if line.startswith("wrote ")]
    stage.check(len(wrote) == 1, f"export written once, by the main process: {wrote}")
    stage.check(
        checkpoint_step(two / "checkpoint.safetensors") == int(steps),
        "one checkpoint, at the last step",
    )
    # one step's loss is noisy (random t and ε): compare the mean loss over fixed draws instead
    log = work / "ddp.loss.log"
    command = [PYTHON, "-c", HELD_OUT_LOSS, str(TINY_MODEL), str(data), str(two)]
    status = run(stage, command, log)
    try:
        result = json.loads(log.read_text().strip().splitlines()[-1])
        stage.check(
            result["after"] < result["before"],
            f"the loss fell: {result['before']:.4f} → {result['after']:.4f} (mean over "
            f"{result['draws']} fixed draws of t and ε, before and after training)",
        )
    except (ValueError, IndexError):
        stage.check(False, f"the loss could not be measured (status {status}): {tail(log)}")
    exists = (two / "adapter.safetensors").is_file() and (one / "adapter.safetensors").is_file()
    equal, largest = (
        same_tensors(two / "adapter.safetensors", one / "adapter.safetensors", DDP_TOLERANCE)
        if exists
        else (False, -1)
    )
    stage.check(
        equal,
        f"2-process adapter == 1-process adapter at the same global batch of 8 "
        f"(max |Δ| {largest:.2e}, tolerance {DDP_TOLERANCE:g})",
    )
    return stage


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, help="working folder (default: a temporary one)")
    parser.add_argument("--stages", default="abcd", help="which stages to run (default abcd)")
    parser.add_argument("--notebook", type=Path, default=NOTEBOOK, help="chapter 08 (stage c)")
    args = parser.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="lokr-edu-rehearse-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"rehearsal in {work}", flush=True)
    start = time.perf_counter()
    stages: list[Stage] = []

    def report(stage: Stage) -> None:
        stages.append(stage)
        print(
            f"\n[{'ok' if stage.ok else 'FAILED'}] {stage.name}: {stage.seconds:.0f} s "
            f"(CPU {stage.cpu:.0f} s), peak {stage.peak / 2**30:.1f} GiB",
            flush=True,
        )
        for line in stage.lines:
            print(f"    {line}", flush=True)

    if set(args.stages) & set("abc"):
        build, model = stage_build(work)
        report(build)
        if build.ok:
            if "a" in args.stages:
                report(stage_train(work, model))
            if "b" in args.stages:
                report(stage_reload(work, model))
            if "c" in args.stages:
                report(stage_notebook(work, model, args.notebook.resolve()))
    if "d" in args.stages:
        report(stage_multiprocess(work))
    total = time.perf_counter() - start
    print(f"\n{'stage':<66} {'time':>7} {'CPU time':>9} {'peak memory':>12}")
    for stage in stages:
        status = "ok" if stage.ok else "FAILED"
        print(
            f"{stage.name:<66} {stage.seconds:6.0f}s {stage.cpu:8.0f}s "
            f"{stage.peak / 2**30:8.1f} GiB  {status}"
        )
    print(f"{'total':<66} {total:6.0f}s {sum(s.cpu for s in stages):8.0f}s")
    return 0 if stages and all(s.ok for s in stages) else 1


if __name__ == "__main__":
    sys.exit(main())
