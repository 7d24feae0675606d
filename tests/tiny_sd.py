"""A tiny SD1.5-shaped pipeline for the interop tests: built in milliseconds, no download.

The U-Net has SD1.5's block types (cross-attention down/up blocks, to_q/to_k/to_v/to_out.0,
1×1 proj_in/proj_out); the text encoder is a 2-layer CLIPTextModel. No tokenizer is needed:
the tests feed token ids.
"""

from __future__ import annotations

import logging

import torch
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

logging.getLogger("diffusers").setLevel(logging.ERROR)
logging.getLogger("LyCORIS").setLevel(logging.ERROR)


def tiny_unet() -> UNet2DConditionModel:
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=4,
        norm_num_groups=8,
    ).eval()


def tiny_text_encoder() -> CLIPTextModel:
    torch.manual_seed(1)
    config = CLIPTextConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        vocab_size=100,
        max_position_embeddings=16,
    )
    return CLIPTextModel(config).eval()


def tiny_pipeline() -> StableDiffusionPipeline:
    torch.manual_seed(2)
    vae = AutoencoderKL(
        block_out_channels=(32,),
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
        latent_channels=4,
        norm_num_groups=8,
    )
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=tiny_text_encoder(),
        tokenizer=None,
        unet=tiny_unet(),
        scheduler=DDPMScheduler(clip_sample=False, steps_offset=1),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


INPUTS = {
    "latents": torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3)),
    "ids": torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(4)),
}


@torch.no_grad()
def outputs(pipe) -> tuple[torch.Tensor, torch.Tensor]:
    """(text encoder output, U-Net noise prediction) for fixed inputs."""
    text = pipe.text_encoder(INPUTS["ids"])[0]
    noise = pipe.unet(INPUTS["latents"], 10, encoder_hidden_states=text).sample
    return text, noise


def randomize_adapters(*models: torch.nn.Module, std: float = 0.1) -> None:
    torch.manual_seed(5)
    with torch.no_grad():
        for model in models:
            for name, p in model.named_parameters():
                if p.requires_grad or "lora" in name or "hada" in name or "lokr" in name:
                    p.normal_(std=std)
