"""Opt-in (`make test-full-arch`): one LoKr training step of the full-size SD1.5 U-Net on the CPU.

The real architecture from its published config, with random weights (nothing is downloaded),
64×64 latents (a 512×512 image), batch 1, LoKr r = 8 on to_q, to_k, to_v, to_out.0. It proves the
chapter 07 training path runs at full size, and reports the time and peak memory it took. Not part
of `make test` (it takes minutes and several GB); run it with `make test-full-arch`.
"""

from __future__ import annotations

import resource
import time

import pytest
import torch

from lokr_edu.adapters import adapter_layers, inject
from lokr_edu.diffusion import noise_prediction_loss
from lokr_edu.sd15 import build_unet

pytestmark = pytest.mark.full_arch


def test_one_lokr_training_step_of_the_full_sd15_unet() -> None:
    from diffusers import DDPMScheduler

    torch.manual_seed(0)
    start = time.perf_counter()
    unet = build_unet(device="cpu")
    built = time.perf_counter() - start
    assert sum(p.numel() for p in unet.parameters()) == 859_520_964
    wrapped = inject(unet, ["to_q", "to_k", "to_v", "to_out.0"], "lokr", rank=8)
    assert len(wrapped) == 128 == len(list(adapter_layers(unet)))
    unet.enable_gradient_checkpointing()  # as diffusers' script offers: trade compute for memory
    optimizer = torch.optim.AdamW([p for p in unet.parameters() if p.requires_grad], lr=1e-4)
    latents = torch.randn(1, 4, 64, 64)
    text = torch.randn(1, 77, 768)
    start = time.perf_counter()
    loss = noise_prediction_loss(
        unet, latents, text, DDPMScheduler(), torch.Generator().manual_seed(0)
    )
    loss.backward()
    optimizer.step()
    step = time.perf_counter() - start
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB
    grads = [p.grad for p in unet.parameters() if p.requires_grad]
    assert torch.isfinite(loss) and all(g is not None and torch.isfinite(g).all() for g in grads)
    print(f"\nbuilt in {built:.0f} s; one LoKr training step: {step:.0f} s")
    print(f"peak memory of the process: {peak_gib:.1f} GiB")
