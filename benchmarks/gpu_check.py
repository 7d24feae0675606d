"""GPU check: SD1.5 adapter training on CUDA in fp16, steps per second and peak GPU memory,
lokr_edu's LoRA and LoKr against peft's LoRA, plain and DreamBooth steps, in one run.

    make gpu-check                                  # a CUDA GPU; under 5 minutes
    python benchmarks/gpu_check.py --dry-run        # every code path on the CPU, about a minute

What one step is: the training step of lokr_edu.diffusion.train at 512×512, batch 1, in its two
forms. "plain" is diffusers' train_text_to_image_lora.py: fixed random pixels are encoded by the
VAE and 77 random token ids by the text encoder (no grad), then the ε-prediction loss
(lokr_edu.diffusion.prior_preservation_loss with one set, which is noise_prediction_loss) through
the U-Net, backward, gradient norm clipped to 1, AdamW (lr 1e-4). "DreamBooth" is diffusers'
train_dreambooth_lora.py --with_prior_preservation: an instance batch and a class batch (each of
--batch-size, other pixels and tokens) go through the U-Net together, loss = instance + 1 · class.
Mixed precision as diffusers' scripts do it: frozen weights in fp16, the trained adapter in fp32
(diffusers.training_utils.cast_training_params), the loss under torch.autocast(fp16) and scaled by
torch.amp.GradScaler (what accelerate's mixed_precision="fp16" wraps). The pipeline is full-size
SD1.5 with random weights from the published configs (lokr_edu.sd15.random_pipeline): nothing is
downloaded, and speed and memory do not depend on the weights' values.

Configurations, on the U-Net's to_q, to_k, to_v, to_out.0 (diffusers' script), each for both
steps and with and without gradient checkpointing (unet.enable_gradient_checkpointing), all on
the same pipeline (each adapter is taken out again before the next goes in):

    peft LoRA r=4        unet.add_adapter(LoraConfig(r=4, lora_alpha=4,
                         init_lora_weights="gaussian", target_modules=...)), as diffusers' script
    lokr_edu LoRA r=4    lokr_edu.inject(unet, targets, "lora", rank=4)
    lokr_edu LoKr r=8    lokr_edu.inject(unet, targets, "lokr", rank=8)

How: per configuration, --warmup steps (not timed), then --steps timed steps between two
torch.cuda.synchronize(); steps/s = steps / elapsed. torch.cuda.reset_peak_memory_stats() after
the warm-up, then max_memory_allocated (live tensors: frozen weights, adapter, optimizer state,
activations) and max_memory_reserved (what PyTorch's caching allocator took from the driver; the
CUDA context is in neither) over the timed steps. "× peft" divides by peft's LoRA with the same
checkpointing setting and the same step: below 1 is faster / smaller. Writes
benchmarks/results/gpu_check_<gpu>.md.

--dry-run runs the same code on the CPU: the shipped tiny pipeline (lokr_edu.digits_sd, 8×8
pixels), bf16 autocast standing in for fp16 (no loss scaling), 1 warm-up and 1 timed step.
There is no CUDA allocator there: "allocated" is the bytes of the tensors held before the timed
steps (every weight and the optimizer state) plus the peak of torch's CPU allocations during them
(recorded by torch.profiler with profile_memory=True, which also slows them: a dry run's times
are no benchmark), and "reserved" is not measured. --dry-run --full-size rehearses the GPU run's
own pipeline instead (full-size random SD1.5, 64×64 pixels; about 7 minutes and 4.5 GiB on 2
cores).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import itertools
import math
import platform
import re
import shlex
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

import torch

from lokr_edu.adapters import adapter_layers, inject
from lokr_edu.diffusion import prior_preservation_loss

RESULTS = Path(__file__).parent / "results"
TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]  # diffusers' train_text_to_image_lora.py
ADAPTERS = {
    "peft LoRA r=4": ("peft", 4),
    "lokr_edu LoRA r=4": ("lora", 4),
    "lokr_edu LoKr r=8": ("lokr", 8),
}
REFERENCE = "peft LoRA r=4"
STEPS = {"plain": 1, "DreamBooth": 2}  # sets of examples a step draws: instance (and class)
COLUMNS = [
    "step",
    "adapter",
    "gradient checkpointing",
    "trained parameters",
    "steps/s",
    "step time × peft",
    "peak allocated (MiB)",
    "× peft",
    "peak reserved (MiB)",
    "× peft",
    "mean loss",
]
NO_GPU = (
    "gpu_check: a CUDA GPU is needed (torch.cuda.is_available() is False here). Install the CUDA "
    "build of PyTorch on a GPU machine (README, 'GPUs'), or run\n"
    "    python benchmarks/gpu_check.py --dry-run\n"
    "to exercise every code path on the CPU with a tiny model."
)


def build_pipeline(tiny: bool, device: torch.device, dtype: torch.dtype):
    """The pipeline every configuration trains on: frozen, on `device`, in `dtype`."""
    if tiny:
        from lokr_edu.diffusion import load_pipeline
        from lokr_edu.digits_sd import TINY_MODEL

        pipe = load_pipeline(TINY_MODEL)
    else:
        from lokr_edu.sd15 import random_pipeline

        pipe = random_pipeline(dtype=dtype)  # built on the CPU (20-40 s on 2 cores)
    for part in (pipe.unet, pipe.vae, pipe.text_encoder):
        part.requires_grad_(False).to(device, dtype)
    return pipe


def add_adapter(unet, kind: str, rank: int) -> None:
    """Adapt the U-Net's TARGETS, the trained factors in fp32 (cast_training_params)."""
    from diffusers.training_utils import cast_training_params

    torch.manual_seed(0)
    if kind == "peft":
        from peft import LoraConfig

        config = LoraConfig(
            r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=TARGETS
        )
        unet.add_adapter(config)
    else:
        inject(unet, TARGETS, kind, rank=rank)
    cast_training_params(unet, dtype=torch.float32)


def remove_adapter(unet, kind: str) -> None:
    """Put the U-Net's original layers back (its frozen weights were never changed)."""
    if kind == "peft":
        unet.unload_lora()
        return
    for name, layer in list(adapter_layers(unet)):
        parent, _, child = name.rpartition(".")
        setattr(unet.get_submodule(parent), child, layer.base)


class Trainer:
    """One configuration's optimizer, loss scaler and fixed batches (one per set: the instance
    examples, and for a DreamBooth step the class examples); `step()` is one training step."""

    def __init__(
        self, pipe, batch_size: int, resolution: int, amp_dtype: torch.dtype, sets: int = 1
    ) -> None:
        self.pipe, self.unet, self.amp_dtype = pipe, pipe.unet, amp_dtype
        device, dtype = pipe.unet.device, pipe.unet.dtype
        self.params = [p for p in self.unet.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=1e-4)
        self.scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
        generator = torch.Generator().manual_seed(0)
        config = pipe.text_encoder.config
        self.batches = []  # (pixels (B, 3, H, W), token ids (B, L)) per set
        for _ in range(sets):
            pixels = torch.rand(batch_size, 3, resolution, resolution, generator=generator)
            shape = (batch_size, config.max_position_embeddings)
            tokens = torch.randint(config.vocab_size, shape, generator=generator)
            self.batches.append(((pixels * 2 - 1).to(device, dtype), tokens.to(device)))
        self.weights = [1.0] * sets  # DreamBooth's λ = 1
        self.generator = generator

    def step(self) -> torch.Tensor:
        vae, device = self.pipe.vae, self.unet.device
        sets = []
        with torch.no_grad():
            for pixels, tokens in self.batches:
                latents = vae.encode(pixels).latent_dist.sample(self.generator)
                sets.append(
                    (latents * vae.config.scaling_factor, self.pipe.text_encoder(tokens)[0])
                )
        with torch.autocast(device.type, dtype=self.amp_dtype):
            loss, _ = prior_preservation_loss(
                self.unet, self.pipe.scheduler, sets, self.weights, self.generator
            )
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    def held_bytes(self) -> int:
        """Bytes of every weight, buffer and optimizer state tensor (what exists between steps)."""
        parts = (self.unet, self.pipe.vae, self.pipe.text_encoder)
        tensors = [t for m in parts for t in itertools.chain(m.parameters(), m.buffers())]
        tensors += [
            t for s in self.optimizer.state.values() for t in s.values() if torch.is_tensor(t)
        ]
        return sum(t.numel() * t.element_size() for t in tensors)


def profiled_peak(prof) -> int:
    """The peak of the running sum of torch's CPU allocations and frees recorded by `prof`."""
    events = prof.profiler.kineto_results.events()
    changes = sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]")
    return max(itertools.accumulate((n for _, n in changes), initial=0))


def measure(
    pipe, kind: str, rank: int, checkpointing: bool, args, amp_dtype, sets: int = 1
) -> dict:
    """Warm up, time args.steps steps and read the peak memory of one configuration."""
    unet, cuda = pipe.unet, pipe.unet.device.type == "cuda"
    add_adapter(unet, kind, rank)
    if checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    trainer = Trainer(pipe, args.batch_size, args.resolution, amp_dtype, sets)
    for _ in range(args.warmup):
        trainer.step()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        probe = contextlib.nullcontext()
    else:  # no CUDA allocator: record the CPU allocator's allocations (dry run only)
        held = trainer.held_bytes()
        probe = torch.profiler.profile(
            activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True
        )
    with probe as prof:
        start = time.perf_counter()
        losses = [trainer.step() for _ in range(args.steps)]
        if cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    if cuda:
        allocated, reserved = torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()
    else:
        allocated, reserved = held + profiled_peak(prof), None
    row = {
        "kind": kind,
        "checkpointing": checkpointing,
        "trained": sum(p.numel() for p in trainer.params),
        "steps_per_s": args.steps / seconds,
        "allocated_mib": allocated / 2**20,
        "reserved_mib": None if reserved is None else reserved / 2**20,
        "loss": torch.stack(losses).float().mean().item(),
    }
    if checkpointing:
        unet.disable_gradient_checkpointing()
    del trainer
    remove_adapter(unet, kind)
    gc.collect()  # the adapter, its gradients and optimizer state go before the next configuration
    if cuda:
        torch.cuda.empty_cache()
    return row


def run(args) -> list[dict]:
    """Every step kind and adapter, with and without gradient checkpointing; one row each, with
    its ratios to peft's LoRA on the same step and checkpointing."""
    device = torch.device("cpu" if args.dry_run else "cuda")
    amp_dtype = torch.bfloat16 if args.dry_run else torch.float16
    pipe = build_pipeline(args.dry_run and not args.full_size, device, amp_dtype)
    rows = []
    for step, sets in STEPS.items():
        for checkpointing in (False, True):
            for name, (kind, rank) in ADAPTERS.items():
                found = measure(pipe, kind, rank, checkpointing, args, amp_dtype, sets)
                row = {"step": step, "adapter": name, **found}
                rows.append(row)
                print(
                    f"{step:<10} {name:<18} checkpointing={str(checkpointing):<5} "
                    f"{row['steps_per_s']:7.2f} steps/s {row['allocated_mib']:9.1f} MiB "
                    f"allocated (loss {row['loss']:.3f})",
                    flush=True,
                )
    for row in rows:
        peft = next(
            r
            for r in rows
            if (r["adapter"], r["checkpointing"], r["step"])
            == (REFERENCE, row["checkpointing"], row["step"])
        )
        row["time_vs_peft"] = peft["steps_per_s"] / row["steps_per_s"]
        row["allocated_vs_peft"] = row["allocated_mib"] / peft["allocated_mib"]
        row["reserved_vs_peft"] = (
            None if row["reserved_mib"] is None else row["reserved_mib"] / peft["reserved_mib"]
        )
    return rows


def environment(dry_run: bool) -> str:
    versions = ", ".join(f"{p} {version(p)}" for p in ("torch", "diffusers", "peft", "accelerate"))
    if dry_run:
        device = f"CPU ({platform.processor() or platform.machine()}), dry run"
    else:
        props = torch.cuda.get_device_properties(0)
        device = f"{props.name} ({props.total_memory / 2**30:.0f} GiB), CUDA {torch.version.cuda}"
    return f"{device}; {versions}; Python {platform.python_version()}"


def table(rows: list[dict]) -> list[str]:
    def number(value, spec: str) -> str:
        return "—" if value is None else format(value, spec)

    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + " --- |" * len(COLUMNS)]
    for r in rows:
        cells = [
            r["step"],
            r["adapter"],
            "yes" if r["checkpointing"] else "no",
            f"{r['trained']:,}",
            number(r["steps_per_s"], ".3g"),
            number(r["time_vs_peft"], ".2f"),
            number(r["allocated_mib"], ".1f"),
            number(r["allocated_vs_peft"], ".2f"),
            number(r["reserved_mib"], ".1f"),
            number(r["reserved_vs_peft"], ".2f"),
            f"{r['loss']:.4f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def report(rows: list[dict], args, seconds: float) -> str:
    model = "full-size random SD1.5" if args.full_size else "tiny model"
    mode = f"dry run on the CPU, {model}, bf16" if args.dry_run else "CUDA, fp16"
    return (
        "\n".join(
            [
                f"# GPU check: SD1.5 adapter training step ({mode})",
                "",
                f"Environment: {environment(args.dry_run)}.",
                f"Batch {args.batch_size}, {args.resolution}×{args.resolution} pixels, "
                f"per configuration {args.warmup} warm-up and {args.steps} timed step(s); "
                f"whole run {seconds:.0f} s. Generated by `{args.command}` (method: its "
                "docstring and benchmarks/README.md).",
                "",
                *table(rows),
                "",
                "× peft: this configuration's step time or peak memory divided by peft's LoRA r=4 "
                "with the same step and gradient checkpointing setting (below 1: faster / "
                "smaller). A DreamBooth step puts an instance and a class batch through the "
                "U-Net together: twice the rows of a plain step.",
            ]
        )
        + "\n"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dry-run", action="store_true", help="on the CPU, a tiny model")
    parser.add_argument("--steps", type=int, help="timed steps per config (GPU: 20; dry run: 1)")
    parser.add_argument("--warmup", type=int, help="untimed steps first (GPU: 3; dry run: 1)")
    parser.add_argument(
        "--full-size",
        action="store_true",
        help="with --dry-run: the full-size random SD1.5 at 64 px (minutes, 4.5 GiB of memory)",
    )
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--resolution", type=int, help="pixels (GPU: 512; dry run: 8 or 64)")
    parser.add_argument("--out", type=Path, help="the markdown file to write")
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    args.command = shlex.join(["python", "benchmarks/gpu_check.py", *argv])
    if args.full_size and not args.dry_run:
        parser.error("--full-size goes with --dry-run (the GPU check is always full size)")
    if not args.dry_run and not torch.cuda.is_available():
        print(NO_GPU, file=sys.stderr)
        return 2
    defaults = (1, 1, 64 if args.full_size else 8) if args.dry_run else (20, 3, 512)
    for name, value in zip(("steps", "warmup", "resolution"), defaults, strict=True):
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.out is None:
        if args.dry_run:
            args.out = Path(tempfile.gettempdir()) / "gpu_check_dry_run.md"
        else:
            slug = re.sub(r"[^a-z0-9]+", "_", torch.cuda.get_device_name(0).lower()).strip("_")
            args.out = RESULTS / f"gpu_check_{slug}.md"
    start = time.perf_counter()
    rows = run(args)
    seconds = time.perf_counter() - start
    text = report(rows, args, seconds)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text, encoding="utf-8")
    print(text)
    print(f"Whole run: {seconds:.0f} s. Written to {args.out}")
    if not args.dry_run and seconds > 300:
        print("note: over the 5-minute budget; fewer --steps would do", file=sys.stderr)
    if not all(math.isfinite(r["loss"]) for r in rows):
        print("warning: a loss was not finite (see the table)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
