"""Stable Diffusion 1.5 as an architecture: its U-Net and text encoder, with no weights.

The two networks an SD1.5 adapter trains are built from their published configurations
(stable-diffusion-v1-5/stable-diffusion-v1-5, formerly runwayml/stable-diffusion-v1-5:
unet/config.json and text_encoder/config.json, copied below) on PyTorch's meta device: every
tensor has a shape and no storage, so the whole 982M-parameter model builds in a fraction of a
second with no download. That is all chapter 03 needs to count what LoRA / LoHa / LoKr would
store for SD1.5, and all chapter 07 needs to name the layers.

`random_pipeline` builds the whole SD1.5 pipeline (also its VAE, scheduler and a stand-in
tokenizer) with random weights on the CPU, and `save_random_pipeline` writes it as a folder that
`lokr_edu.load_pipeline` and `python -m lokr_edu.train --model FOLDER` read: the GPU path at full
size, rehearsed offline (`make rehearse`).

Two target sets name the layers an adapter wraps:
- "diffusers": the diffusers LoRA training scripts, U-Net `to_q`, `to_k`, `to_v`, `to_out.0`
  (train_text_to_image_lora.py); text encoder `q_proj`, `k_proj`, `v_proj`, `out_proj`
  (train_dreambooth_lora.py with --train_text_encoder).
- "kohya": kohya sd-scripts networks/lora.py, the format A1111 / ComfyUI / LyCORIS read: every
  nn.Linear and 1×1 nn.Conv2d inside a U-Net `Transformer2DModel`, and inside the text
  encoder's `CLIPAttention` / `CLIPMLP` (`CLIPSdpaAttention` in some transformers 4 releases).
  Each is saved under `kohya_key(...)`, e.g.
  `lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q`.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections import Counter
from collections.abc import Iterator
from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import nn

if TYPE_CHECKING:
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

# The Hub id of SD1.5 (RunwayML's runwayml/stable-diffusion-v1-5 is gone from the Hub; this is
# the same model, and the configs below are its published ones).
MODEL_ID = "stable-diffusion-v1-5/stable-diffusion-v1-5"


class _KnownHarmless(logging.Filter):
    """Drops transformers' notice that an image processor falls back to PIL without torchvision.

    Importing diffusers' StableDiffusionPipeline touches transformers' CLIP and SigLIP image
    processors (for the safety checker, which the course never loads); without torchvision they
    fall back to their PIL versions and say so on every first screen. Nothing here uses them.
    Every other record of that logger passes.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return "requires torchvision (not installed); falling back to" not in record.getMessage()


_KNOWN_HARMLESS = _KnownHarmless()


def hide_known_harmless_notices() -> None:
    """From now on, drop transformers' torchvision notice (`_KnownHarmless`); once per process.

    Called by what the course runs: `lokr_edu.repro.setup_notebook` at the top of every notebook,
    and the `lokr-edu-train` command. Never on import: a program that imports lokr_edu keeps its
    logging as it was.
    """
    source = logging.getLogger("transformers.utils.import_utils")
    if _KNOWN_HARMLESS not in source.filters:
        source.addFilter(_KNOWN_HARMLESS)


# stable-diffusion-v1-5/stable-diffusion-v1-5, unet/config.json (diffusers UNet2DConditionModel)
UNET_CONFIG: dict[str, object] = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "center_input_sample": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "down_block_types": (
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ),
    "up_block_types": (
        "UpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
    ),
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
}

# stable-diffusion-v1-5/stable-diffusion-v1-5, text_encoder/config.json: CLIP ViT-L/14 (text)
TEXT_ENCODER_CONFIG: dict[str, object] = {
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "projection_dim": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "attention_dropout": 0.0,
    "dropout": 0.0,
    "initializer_range": 0.02,
    "initializer_factor": 1.0,
    "pad_token_id": 1,
    "bos_token_id": 0,
    "eos_token_id": 2,
}

# stable-diffusion-v1-5/stable-diffusion-v1-5, vae/config.json (diffusers AutoencoderKL)
VAE_CONFIG: dict[str, object] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (128, 256, 512, 512),
    "layers_per_block": 2,
    "act_fn": "silu",
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 512,
    "scaling_factor": 0.18215,
}

# stable-diffusion-v1-5/stable-diffusion-v1-5, scheduler/scheduler_config.json (PNDMScheduler)
SCHEDULER_CONFIG: dict[str, object] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
}

UNET_PARAMS = 859_520_964  # parameters of the SD1.5 U-Net
TEXT_ENCODER_PARAMS = 123_060_480  # parameters of the SD1.5 text encoder
VAE_PARAMS = 83_653_863  # parameters of the SD1.5 VAE

COMPONENTS = ("unet", "text_encoder")
TARGET_SETS = ("diffusers", "kohya")

# kohya sd-scripts networks/lora.py: LoRA goes on Linear / 1×1 Conv2d inside these blocks.
KOHYA_BLOCKS = {
    "unet": ("Transformer2DModel",),
    "text_encoder": ("CLIPAttention", "CLIPSdpaAttention", "CLIPMLP"),
}
# diffusers / peft: a module is a target when its dotted name ends with one of these.
DIFFUSERS_SUFFIXES = {
    "unet": ("to_q", "to_k", "to_v", "to_out.0"),
    "text_encoder": ("q_proj", "k_proj", "v_proj", "out_proj"),
}
KOHYA_PREFIX = {"unet": "lora_unet", "text_encoder": "lora_te"}


class Target(NamedTuple):
    """One layer an adapter wraps: its dotted module name, kind and weight shape (m × n)."""

    name: str  # e.g. "down_blocks.0.attentions.0.proj_in"
    kind: str  # "linear" or "conv1x1"
    out_features: int  # m
    in_features: int  # n


@contextlib.contextmanager
def _quiet(library_logging) -> Iterator[None]:
    """Silence a library's logger (diffusers' or transformers') while a model is built."""
    verbosity = library_logging.get_verbosity()
    library_logging.set_verbosity_error()
    try:
        yield
    finally:
        library_logging.set_verbosity(verbosity)


def build_unet(device: str | torch.device = "meta") -> UNet2DConditionModel:
    """The SD1.5 U-Net from UNET_CONFIG, 859,520,964 parameters, on `device` (meta: no memory).

    Defined in chapter 03 (03_loha_and_lokr.ipynb).
    """
    from diffusers import UNet2DConditionModel
    from diffusers.utils import logging as diffusers_logging

    with _quiet(diffusers_logging), torch.device(device):
        return UNet2DConditionModel(**UNET_CONFIG)


def build_text_encoder(device: str | torch.device = "meta") -> CLIPTextModel:
    """The SD1.5 text encoder (CLIP ViT-L/14 text), 123,060,480 parameters, on `device`.

    Defined in chapter 03 (03_loha_and_lokr.ipynb).
    """
    from transformers import CLIPTextConfig, CLIPTextModel
    from transformers.utils import logging as transformers_logging

    with _quiet(transformers_logging), torch.device(device):
        return CLIPTextModel(CLIPTextConfig(**TEXT_ENCODER_CONFIG))


@functools.cache
def _meta_model(component: str) -> nn.Module:
    """One shared meta-device model per component, only read here (never hand it out)."""
    return build_unet() if component == "unet" else build_text_encoder()


def _check(component: str, target_set: str | None = None) -> None:
    if component not in COMPONENTS:
        raise ValueError(f"component must be one of {COMPONENTS}, got {component!r}")
    if target_set is not None and target_set not in TARGET_SETS:
        raise ValueError(f"target_set must be one of {TARGET_SETS}, got {target_set!r}")


def _as_target(name: str, module: nn.Module) -> Target | None:
    """A Target for a Linear or a 1×1 Conv2d, None for anything else."""
    if isinstance(module, nn.Linear):
        return Target(name, "linear", module.out_features, module.in_features)
    if isinstance(module, nn.Conv2d) and module.kernel_size == (1, 1):
        return Target(name, "conv1x1", module.out_channels, module.in_channels // module.groups)
    return None


@functools.cache
def targets(component: str = "unet", target_set: str = "kohya") -> tuple[Target, ...]:
    """The layers `target_set` adapts in the SD1.5 `component`, in module order.

    kohya: every Linear / 1×1 Conv2d inside a KOHYA_BLOCKS block (192 in the U-Net, 72 in the
    text encoder). diffusers: modules whose name ends in a DIFFUSERS_SUFFIXES entry (128 in the
    U-Net: 16 transformer blocks × attn1, attn2 × 4 projections; 48 in the text encoder).
    Defined in chapter 03 (03_loha_and_lokr.ipynb); used in chapter 07.
    """
    _check(component, target_set)
    model = _meta_model(component)
    found: dict[str, Target] = {}
    if target_set == "kohya":
        for block_name, block in model.named_modules():
            if type(block).__name__ not in KOHYA_BLOCKS[component]:
                continue
            for child_name, child in block.named_modules():
                name = f"{block_name}.{child_name}" if child_name else block_name
                target = _as_target(name, child)
                if target is not None:
                    found.setdefault(name, target)
    else:
        suffixes = DIFFUSERS_SUFFIXES[component]
        for name, module in model.named_modules():
            if any(name == s or name.endswith("." + s) for s in suffixes):
                target = _as_target(name, module)
                if target is not None:
                    found[name] = target
    return tuple(found.values())


def kohya_key(name: str, component: str = "unet") -> str:
    """The kohya / LyCORIS key prefix of a module: `lora_unet_` or `lora_te_` + name, "." -> "_".

    Text-encoder names are those of transformers 4 ("text_model.encoder.layers.0..."), the names
    every SD1.5 kohya file uses; transformers 5 dropped the `text_model.` level, so it is put
    back here: "encoder.layers.0.mlp.fc1" -> "lora_te_text_model_encoder_layers_0_mlp_fc1".
    Defined in chapter 07.
    """
    _check(component)
    if component == "text_encoder" and not name.startswith("text_model."):
        name = "text_model." + name
    return f"{KOHYA_PREFIX[component]}_{name}".replace(".", "_")


def shape_counts(layers: tuple[Target, ...] | list[Target]) -> dict[tuple[int, int], int]:
    """The distinct (m, n) weight shapes among `layers`, with how many layers have each.

    Sorted by shape. Defined in chapter 03 (03_loha_and_lokr.ipynb).
    """
    counts = Counter((t.out_features, t.in_features) for t in layers)
    return dict(sorted(counts.items()))


def unet_tokens(height: int = 512, width: int = 512, target_set: str = "kohya") -> dict[str, int]:
    """How many tokens each U-Net target multiplies per image: its module name -> rows.

    A target inside a transformer block maps a (tokens × n) matrix to (tokens × m), with
    tokens = h·w of the latent at its level. The VAE divides the image by 8 and the U-Net halves
    the latent three times, so at 512 × 512 the 320-channel level sees 64·64 = 4096 tokens, 640
    channels 1024, 1280 channels 256, and the mid block (1280) 64; cross-attention's to_k / to_v
    read the 77 text tokens instead. What a layer's step costs depends on batch × tokens, so a
    1280-wide layer fed 2 × 4096 rows is SD1.5 at 512 px with a batch of 32. (Every text-encoder
    layer sees 77 tokens.) Found by running the meta-device U-Net once with a hook on each target.
    Defined in chapter 04 (04_adapter_from_scratch.ipynb, the appendix).
    """
    if height <= 0 or width <= 0 or height % 64 or width % 64:
        raise ValueError(
            f"height and width must be positive multiples of 64 (latent / 8, halved three times),"
            f" got {height}×{width}"
        )
    model = _meta_model("unet")
    modules = dict(model.named_modules())
    tokens: dict[str, int] = {}

    def record(name: str):
        def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: object) -> None:
            x = inputs[0]  # Linear: (batch, tokens, n); 1×1 Conv2d: (batch, n, h, w)
            tokens[name] = x.shape[1] if x.dim() == 3 else x.shape[-2] * x.shape[-1]

        return hook

    handles = [
        modules[t.name].register_forward_hook(record(t.name)) for t in targets("unet", target_set)
    ]
    try:
        latent = torch.zeros(1, 4, height // 8, width // 8, device="meta")
        text = torch.zeros(1, 77, 768, device="meta")
        with torch.no_grad():
            model(latent, torch.zeros(1, device="meta"), encoder_hidden_states=text)
    finally:
        for handle in handles:
            handle.remove()
    return tokens


# The stand-in tokenizer's words: every letter (so any lowercase word can be written, a letter or
# a merge at a time) and the words of the course's prompts, one token each.
STAND_IN_WORDS = (
    *"abcdefghijklmnopqrstuvwxyz",
    *"a an the of in on with and photo picture painting drawing style portrait dog cat".split(),
    *"person face man woman house tree flower sky landscape city car red green blue".split(),
    *"black white handwritten digit rotated sks my subject concept".split(),
)


def stand_in_tokenizer(model_max_length: int = 77):
    """A CLIPTokenizer with SD1.5's special tokens and length, but a tiny vocabulary.

    SD1.5's real tokenizer (49,408 BPE tokens learned by OpenAI) cannot be written without a
    download; this one knows the 26 letters and STAND_IN_WORDS (`write_tiny_clip_vocabulary`), so
    it turns any lowercase prompt into ids below the text encoder's vocab_size. The ids differ
    from SD1.5's: it is a stand-in for rehearsing the code path, not for real prompts.
    Defined in chapter 07.
    """
    import tempfile
    from pathlib import Path

    from transformers import CLIPTokenizer

    from lokr_edu.digits_sd import write_tiny_clip_vocabulary

    with tempfile.TemporaryDirectory() as folder:
        write_tiny_clip_vocabulary(STAND_IN_WORDS, folder)
        return CLIPTokenizer(
            str(Path(folder) / "vocab.json"),
            str(Path(folder) / "merges.txt"),
            model_max_length=model_max_length,
        )


def random_pipeline(seed: int = 0, dtype: torch.dtype = torch.float32):
    """The full-size SD1.5 StableDiffusionPipeline with random weights, built on the CPU.

    U-Net, text encoder and VAE from their published configs (UNET_CONFIG, TEXT_ENCODER_CONFIG,
    VAE_CONFIG: 859.5 M + 123.1 M + 83.7 M parameters), each with its library's own random
    initialization drawn from `seed`; the PNDM scheduler of SCHEDULER_CONFIG, as SD1.5 ships; and
    `stand_in_tokenizer()` (not SD1.5's vocabulary). No safety checker. Nothing is downloaded.
    It draws noise, not pictures, but every shape, dtype and code path is SD1.5's, so a training
    run, a checkpoint, an export and a reload can be rehearsed at full size without the weights.
    About 4 GB in fp32 and 20–40 s on two CPU cores. Defined in chapter 07.
    """
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline
    from diffusers.utils import logging as diffusers_logging

    with torch.random.fork_rng(), _quiet(diffusers_logging):
        torch.manual_seed(seed)
        unet = build_unet("cpu")
        text_encoder = build_text_encoder("cpu")
        vae = AutoencoderKL(**VAE_CONFIG)
        pipe = StableDiffusionPipeline(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=stand_in_tokenizer(),
            unet=unet,
            scheduler=PNDMScheduler(**SCHEDULER_CONFIG),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        return pipe.to(dtype=dtype)


def save_random_pipeline(folder, seed: int = 0, dtype: torch.dtype = torch.float32):
    """Write `random_pipeline(seed)` to `folder` with save_pretrained (safetensors); returns it.

    The folder has SD1.5's layout (model_index.json, unet/, text_encoder/, vae/, scheduler/,
    tokenizer/), so `lokr_edu.load_pipeline(folder)` and `python -m lokr_edu.train --model
    folder` take it as they take a downloaded SD1.5. dtype=torch.float16 halves the 4.3 GB
    on disk (loading converts it back to the dtype asked for). Defined in chapter 07.
    """
    from pathlib import Path

    folder = Path(folder)
    random_pipeline(seed, dtype).save_pretrained(folder, safe_serialization=True)
    return folder
