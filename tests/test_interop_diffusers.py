"""lokr_edu against diffusers (installed from PyPI): `pipe.load_lora_weights` and its files.

On a tiny SD-shaped pipeline (tests/tiny_sd.py): a LoRA saved by `save_adapter` in the peft /
diffusers format (and in the kohya format) loads with `pipe.load_lora_weights` and gives the
U-Net and text-encoder outputs lokr_edu gives (fp32, relative error ≤ 1e-5); a LoRA written by
diffusers' own `save_lora_weights` loads with `load_adapter`. Differences stated by the tests:
- diffusers cannot load LoHa or LoKr files for SD1.5 (it raises); load_adapter can
  (test_diffusers_cannot_load_loha_or_lokr_files_and_load_adapter_can);
- diffusers reads a kohya LoRA file exactly only when every layer of a component has the same
  α; with per-layer α it warns and uses the most common one (test_diffusers_misreads_...);
- with transformers 5, diffusers 0.42 does not find text-encoder targets spelled the
  transformers-4 way (`text_model.encoder...`) in a file's LoraConfig; save_adapter writes the
  module's own path, and load_adapter accepts both (test_text_model_spelling_in_peft_files).
"""

from __future__ import annotations

import json
import logging

import pytest
import torch
from diffusers import StableDiffusionPipeline
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tiny_sd import outputs, randomize_adapters, tiny_pipeline

from lokr_edu.adapters import inject
from lokr_edu.io import load_adapter, save_adapter

logging.getLogger("diffusers").setLevel(logging.ERROR)


def relative_error(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return ((ours - theirs).norm() / theirs.norm()).item()


def assert_same_outputs(ours, theirs, base=None) -> None:
    for i, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        assert relative_error(a, b) <= 1e-5
        if base is not None:
            assert relative_error(base[i], b) > 1e-3  # the adapter really changed something


def lora_pipeline(per_layer_alpha: bool = True):
    """Ranks that differ between layers, and α too unless per_layer_alpha is False (then one α
    per component), so a peft file needs rank_pattern / alpha_pattern."""
    pipe = tiny_pipeline()
    other_alpha = 8.0 if per_layer_alpha else None
    inject(pipe.unet, ["to_q", "to_k", "to_out.0"], "lora", rank=4, alpha=2.0)
    inject(pipe.unet, ["to_v", "proj_in"], "lora", rank=2, alpha=other_alpha or 2.0)  # proj_in 1×1
    inject(pipe.text_encoder, ["q_proj", "k_proj", "v_proj", "out_proj"], "lora", rank=2, alpha=4)
    inject(pipe.text_encoder, ["fc1"], "lora", rank=3, alpha=1.0 if per_layer_alpha else 4.0)
    randomize_adapters(pipe.unet, pipe.text_encoder)
    return pipe


def test_diffusers_load_lora_weights_reads_our_peft_file(tmp_path) -> None:
    pipe = lora_pipeline()
    expected = outputs(pipe)
    path = save_adapter(pipe, tmp_path / "pytorch_lora_weights.safetensors", format="peft")
    fresh = tiny_pipeline()
    base = outputs(fresh)
    fresh.load_lora_weights(str(path))
    assert_same_outputs(outputs(fresh), expected, base)


def test_diffusers_reads_our_kohya_lora_file_when_each_component_has_one_alpha(tmp_path):
    pipe = lora_pipeline(per_layer_alpha=False)
    expected = outputs(pipe)
    path = save_adapter(pipe, tmp_path / "kohya.safetensors")  # lora_unet_*, lora_te_text_model_*
    fresh = tiny_pipeline()
    base = outputs(fresh)
    fresh.load_lora_weights(str(path))
    assert_same_outputs(outputs(fresh), expected, base)


def test_diffusers_misreads_per_layer_alpha_in_kohya_files(tmp_path) -> None:
    """A difference: converting a kohya LoRA file whose layers have different α, diffusers 0.42
    builds alpha_pattern keys it then cannot match (U-Net names with `.processor`, text-encoder
    names with `text_model.` on transformers 5), warns, and gives those layers the most common
    α. The peft-format file of the same adapter loads exactly (the test above), and so does
    the kohya file with load_adapter."""
    pipe = lora_pipeline(per_layer_alpha=True)
    expected = outputs(pipe)
    path = save_adapter(pipe, tmp_path / "kohya.safetensors")
    theirs = tiny_pipeline()
    with pytest.warns(RuntimeWarning, match="alpha_pattern keys did not match any targeted"):
        theirs.load_lora_weights(str(path))
    assert all(relative_error(a, b) > 1e-3 for a, b in zip(outputs(theirs), expected, strict=True))
    ours = tiny_pipeline()
    load_adapter(ours, path)
    assert_same_outputs(outputs(ours), expected)


def test_a_lora_saved_by_diffusers_loads_with_load_adapter(tmp_path) -> None:
    pipe = tiny_pipeline()
    unet_config = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["to_q", "to_k", "to_v", "to_out.0"],
        rank_pattern={"to_v": 2},
        alpha_pattern={"to_v": 1},
    )
    text_config = LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj", "v_proj"])
    pipe.unet.add_adapter(unet_config)
    pipe.text_encoder.add_adapter(text_config)
    torch.manual_seed(5)
    with torch.no_grad():
        for model in (pipe.unet, pipe.text_encoder):
            for name, p in model.named_parameters():
                if "lora_" in name:
                    p.normal_(std=0.1)
    expected = outputs(pipe)
    StableDiffusionPipeline.save_lora_weights(
        str(tmp_path),
        unet_lora_layers=get_peft_model_state_dict(pipe.unet),
        text_encoder_lora_layers=get_peft_model_state_dict(pipe.text_encoder),
        unet_lora_adapter_metadata=unet_config.to_dict(),
        text_encoder_lora_adapter_metadata=text_config.to_dict(),
    )
    path = tmp_path / "pytorch_lora_weights.safetensors"
    with safe_open(str(path), framework="pt") as f:
        assert "lora_adapter_metadata" in f.metadata()
    fresh = tiny_pipeline()
    names = load_adapter(fresh, path)
    assert len(names) == 4 * 2 * 4 + 2 * 2  # 4 blocks × (attn1, attn2) × 4, 2 CLIP × 2
    v = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_v"
    assert dict(fresh.unet.named_modules())[v[5:]].adapters["default"].alpha.item() == 1.0
    assert_same_outputs(outputs(fresh), expected)


@pytest.mark.parametrize("method", ["loha", "lokr"])
def test_diffusers_cannot_load_loha_or_lokr_files_and_load_adapter_can(tmp_path, method):
    """diffusers' load_lora_weights converts kohya LoRA keys only; for SD1.5 it refuses LoHa
    (hada_*) and LoKr (lokr_*) keys. lokr_edu.load_adapter loads them."""
    pipe = tiny_pipeline()
    inject(pipe.unet, ["to_q", "to_k", "to_v", "to_out.0"], method, rank=4, alpha=2.0)
    inject(pipe.text_encoder, ["q_proj", "v_proj"], method, rank=2)
    randomize_adapters(pipe.unet, pipe.text_encoder)
    expected = outputs(pipe)
    path = save_adapter(pipe, tmp_path / f"{method}.safetensors")
    with pytest.raises(ValueError, match="The following keys have not been correctly renamed"):
        tiny_pipeline().load_lora_weights(str(path))
    ours = tiny_pipeline()
    load_adapter(ours, path)
    assert_same_outputs(outputs(ours), expected)


def test_text_model_spelling_in_peft_files(tmp_path) -> None:
    """Files made with transformers 4 name text-encoder layers `text_model.encoder...`.
    diffusers 0.42 on a transformers-5 CLIPTextModel (no `text_model.` level) does not find
    them as LoraConfig targets and raises; load_adapter maps them to the module."""
    pipe = tiny_pipeline()
    inject(pipe.text_encoder, ["q_proj", "v_proj"], "lora", rank=2, alpha=4.0)
    randomize_adapters(pipe.text_encoder)
    expected = outputs(pipe)
    ours = save_adapter(pipe, tmp_path / "ours.safetensors", format="peft")
    tensors = load_file(str(ours))
    with safe_open(str(ours), framework="pt") as f:
        metadata = f.metadata()
    config = json.loads(metadata["lora_adapter_metadata"])
    config["text_encoder.target_modules"] = [
        f"text_model.{m}" for m in config["text_encoder.target_modules"]
    ]
    metadata["lora_adapter_metadata"] = json.dumps(config)
    old = {k.replace("text_encoder.", "text_encoder.text_model."): v for k, v in tensors.items()}
    path = tmp_path / "transformers4.safetensors"
    save_file(old, str(path), metadata)
    with pytest.raises(Exception, match="not found in the base model"):
        tiny_pipeline().load_lora_weights(str(path))
    fresh = tiny_pipeline()
    load_adapter(fresh, path)
    assert_same_outputs(outputs(fresh), expected)
