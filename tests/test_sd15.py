"""lokr_edu.sd15: the SD1.5 networks on the meta device, and the layers each target set adapts."""

from __future__ import annotations

import logging
import re
import warnings
from collections import Counter

import pytest
from torch import nn

from lokr_edu import sd15
from lokr_edu.lowrank import count_params

KOHYA_TOTALS = {  # component: (modules, LoRA r=4 parameters, LoRA r=16 parameters)
    "unet": (192, 1_695_744, 6_782_976),
    "text_encoder": (72, 663_552, 2_654_208),
}


@pytest.fixture(scope="module")
def unet() -> nn.Module:
    return sd15.build_unet()


@pytest.fixture(scope="module")
def text_encoder() -> nn.Module:
    return sd15.build_text_encoder()


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------------------------
# the two networks
# ---------------------------------------------------------------------------------------------


def test_unet_has_the_sd15_parameter_count_and_no_storage(unet: nn.Module) -> None:
    assert n_params(unet) == sd15.UNET_PARAMS == 859_520_964
    assert all(p.is_meta for p in unet.parameters())
    assert type(unet).__name__ == "UNet2DConditionModel"


def test_text_encoder_has_the_sd15_parameter_count_and_no_storage(text_encoder: nn.Module) -> None:
    assert n_params(text_encoder) == sd15.TEXT_ENCODER_PARAMS == 123_060_480
    assert all(p.is_meta for p in text_encoder.parameters())
    assert type(text_encoder).__name__ == "CLIPTextModel"


def test_builders_are_quiet(capfd: pytest.CaptureFixture[str]) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sd15.build_unet()
        sd15.build_text_encoder()
    assert [str(w.message) for w in caught] == []
    assert capfd.readouterr().err == ""


def test_builders_return_fresh_models() -> None:
    assert sd15.build_unet() is not sd15.build_unet()


# ---------------------------------------------------------------------------------------------
# an independent walk: the kohya set read off the block structure by hand
# ---------------------------------------------------------------------------------------------


def transformer_models(unet: nn.Module) -> list[tuple[str, nn.Module]]:
    """The U-Net's Transformer2DModel blocks, found through the block lists, not by class."""
    found = []
    for part in ("down_blocks", "up_blocks"):
        for i, block in enumerate(getattr(unet, part)):
            for j, attention in enumerate(getattr(block, "attentions", [])):
                found.append((f"{part}.{i}.attentions.{j}", attention))
    for j, attention in enumerate(unet.mid_block.attentions):
        found.append((f"mid_block.attentions.{j}", attention))
    return found


def unet_kohya_by_hand(unet: nn.Module) -> dict[str, tuple[int, int]]:
    """proj_in, proj_out and, per transformer block, 8 attention projections + 2 ff layers."""
    layers: dict[str, tuple[int, int]] = {}
    for prefix, t in transformer_models(unet):
        paths = ["proj_in", "proj_out"]
        for b in range(len(t.transformer_blocks)):
            for attn in ("attn1", "attn2"):
                paths += [f"transformer_blocks.{b}.{attn}.{p}" for p in ("to_q", "to_k", "to_v")]
                paths.append(f"transformer_blocks.{b}.{attn}.to_out.0")
            paths += [f"transformer_blocks.{b}.ff.net.0.proj", f"transformer_blocks.{b}.ff.net.2"]
        for path in paths:
            weight = t.get_submodule(path).weight
            layers[f"{prefix}.{path}"] = (weight.shape[0], weight.shape[1])
    return layers


def text_encoder_kohya_by_hand(text_encoder: nn.Module) -> dict[str, tuple[int, int]]:
    """Per encoder layer: q, k, v, out projections and the two MLP layers."""
    root = getattr(text_encoder, "text_model", text_encoder)  # transformers 4 nests it
    prefix = "text_model.encoder" if root is not text_encoder else "encoder"
    layers: dict[str, tuple[int, int]] = {}
    for i, layer in enumerate(root.encoder.layers):
        for path in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
            layers[f"{prefix}.layers.{i}.{path}"] = tuple(layer.get_submodule(path).weight.shape)
        for path in ("self_attn.out_proj", "mlp.fc1", "mlp.fc2"):
            layers[f"{prefix}.layers.{i}.{path}"] = tuple(layer.get_submodule(path).weight.shape)
    return layers


@pytest.mark.parametrize("component", sd15.COMPONENTS)
def test_kohya_set_matches_an_independent_walk(
    component: str, unet: nn.Module, text_encoder: nn.Module
) -> None:
    by_hand = (
        unet_kohya_by_hand(unet)
        if component == "unet"
        else text_encoder_kohya_by_hand(text_encoder)
    )
    found = sd15.targets(component, "kohya")
    assert {t.name: (t.out_features, t.in_features) for t in found} == by_hand
    modules, r4, r16 = KOHYA_TOTALS[component]
    assert len(found) == len(by_hand) == modules
    for r, total in ((4, r4), (16, r16)):
        assert sum(r * (m + n) for m, n in by_hand.values()) == total
        assert sum(count_params("lora", t.out_features, t.in_features, r) for t in found) == total


def test_kohya_unet_set_kinds(unet: nn.Module) -> None:
    found = sd15.targets("unet", "kohya")
    convs = [t for t in found if t.kind == "conv1x1"]
    assert len(convs) == 32  # proj_in and proj_out of the 16 transformers (SD1.5 uses 1×1 convs)
    assert {t.name.rsplit(".", 1)[-1] for t in convs} == {"proj_in", "proj_out"}
    for t in convs:
        assert unet.get_submodule(t.name).kernel_size == (1, 1)
    assert {t.kind for t in found} == {"linear", "conv1x1"}


def test_shape_counts() -> None:
    unet_shapes = sd15.shape_counts(sd15.targets("unet", "kohya"))
    assert sum(unet_shapes.values()) == 192
    assert unet_shapes[(320, 320)] == 40  # 5 transformers at 320 ch: 2 proj + 6 square attn
    assert unet_shapes[(10240, 1280)] == 6  # GEGLU projections at 1280 channels
    assert sd15.shape_counts(sd15.targets("text_encoder", "kohya")) == {
        (768, 768): 48,
        (768, 3072): 12,
        (3072, 768): 12,
    }


# ---------------------------------------------------------------------------------------------
# the diffusers set, and the real peft / LyCORIS as references
# ---------------------------------------------------------------------------------------------


def test_diffusers_set_has_four_projections_per_attention() -> None:
    found = sd15.targets("unet", "diffusers")
    assert len(found) == 16 * 2 * 4 == 128  # 16 transformer blocks × attn1, attn2 × 4
    leaves = {re.sub(r".*\.attn[12]\.", "", t.name) for t in found}
    assert leaves == {"to_q", "to_k", "to_v", "to_out.0"}
    assert all(t.kind == "linear" for t in found)
    assert len(sd15.targets("text_encoder", "diffusers")) == 12 * 4


@pytest.mark.parametrize("component", sd15.COMPONENTS)
def test_diffusers_set_matches_peft(component: str) -> None:
    from peft import LoraConfig, inject_adapter_in_model

    model = sd15.build_unet() if component == "unet" else sd15.build_text_encoder()
    config = LoraConfig(r=4, lora_alpha=4, target_modules=list(sd15.DIFFUSERS_SUFFIXES[component]))
    model = inject_adapter_in_model(config, model, low_cpu_mem_usage=True)
    peft_names = [
        n[: -len(".lora_A.default")]
        for n, _ in model.named_modules()
        if n.endswith(".lora_A.default")
    ]
    found = sd15.targets(component, "diffusers")
    assert peft_names == [t.name for t in found]
    peft_params = sum(p.numel() for n, p in model.named_parameters() if ".lora_" in n)
    assert peft_params == sum(count_params("lora", t.out_features, t.in_features, 4) for t in found)


def test_kohya_set_matches_lycoris_network() -> None:
    """LyCORIS's kohya-style network (preset attn-mlp, LoRA) on the same models: the same layers,
    plus the two time-embedding Linears that its preset adds by name. Under transformers 5 it
    names text-encoder layers without "text_model_" (the model lost that level), which is why
    kohya_key puts it back: SD1.5 files in the wild carry it."""
    from lycoris.kohya import create_network

    logger = logging.getLogger("LyCORIS")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        network = create_network(
            1.0, 4, 4, None, sd15.build_text_encoder(), sd15.build_unet(), preset="attn-mlp"
        )
    finally:
        logger.setLevel(level)
    lycoris_unet = {m.lora_name for m in network.unet_loras}
    ours_unet = {sd15.kohya_key(t.name, "unet") for t in sd15.targets("unet", "kohya")}
    extra = {"lora_unet_time_embedding_linear_1", "lora_unet_time_embedding_linear_2"}
    assert lycoris_unet == ours_unet | extra
    lycoris_te = {
        m.lora_name.replace("lora_te_encoder_", "lora_te_text_model_encoder_")
        for m in network.text_encoder_loras
    }
    ours_te = {sd15.kohya_key(t.name, "text_encoder") for t in sd15.targets("text_encoder")}
    assert lycoris_te == ours_te


# ---------------------------------------------------------------------------------------------
# kohya keys
# ---------------------------------------------------------------------------------------------


def test_kohya_keys() -> None:
    unet_keys = [sd15.kohya_key(t.name, "unet") for t in sd15.targets("unet")]
    te_keys = [sd15.kohya_key(t.name, "text_encoder") for t in sd15.targets("text_encoder")]
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q" in unet_keys
    assert "lora_unet_mid_block_attentions_0_proj_in" in unet_keys
    assert "lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_ff_net_2" in unet_keys
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj" in te_keys
    assert "lora_te_text_model_encoder_layers_11_mlp_fc2" in te_keys
    unet_pattern = re.compile(
        r"lora_unet_(down_blocks_[0-2]|up_blocks_[1-3]|mid_block)_attentions_[0-2]_"
        r"(proj_in|proj_out|transformer_blocks_0_(attn[12]_(to_q|to_k|to_v|to_out_0)"
        r"|ff_net_0_proj|ff_net_2))"
    )
    te_pattern = re.compile(
        r"lora_te_text_model_encoder_layers_([0-9]|1[01])_"
        r"(self_attn_(q|k|v|out)_proj|mlp_fc[12])"
    )
    assert all(unet_pattern.fullmatch(k) for k in unet_keys)
    assert all(te_pattern.fullmatch(k) for k in te_keys)
    assert len(set(unet_keys)) == 192 and len(set(te_keys)) == 72
    # the transformers-4 name maps to the same key
    assert sd15.kohya_key("text_model.encoder.layers.0.mlp.fc1", "text_encoder") == (
        sd15.kohya_key("encoder.layers.0.mlp.fc1", "text_encoder")
    )


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="component"):
        sd15.targets("vae")
    with pytest.raises(ValueError, match="target_set"):
        sd15.targets("unet", "peft")
    with pytest.raises(ValueError, match="component"):
        sd15.kohya_key("encoder.layers.0.mlp.fc1", "te")


def test_targets_are_cached() -> None:
    assert sd15.targets("unet", "kohya") is sd15.targets("unet", "kohya")


# ---------------------------------------------------------------------------------------------
# how many tokens each target sees (chapter 04, section 9)
# ---------------------------------------------------------------------------------------------


def expected_tokens(name: str, height: int, width: int) -> int:
    """From the module name alone: cross-attention keys/values read the 77 text tokens; any other
    target sees the latent (image / 8) at its level, halved once per level below the top."""
    if re.search(r"attn2\.to_[kv]$", name):
        return 77
    level = re.match(r"(down_blocks|up_blocks|mid_block)\.?(\d*)", name)
    assert level is not None, name
    block, index = level.group(1), level.group(2)
    if block == "down_blocks":
        halvings = int(index)  # down_blocks.0 is the full latent
    elif block == "up_blocks":
        halvings = 3 - int(index)  # up_blocks.3 is back at the full latent
    else:
        halvings = 3  # mid_block, the smallest latent
    return (height // 8 >> halvings) * (width // 8 >> halvings)


@pytest.mark.parametrize(("height", "width"), [(512, 512), (768, 512)])
def test_unet_tokens_follow_the_latent_size_at_each_level(height: int, width: int) -> None:
    seen = sd15.unet_tokens(height, width)
    names = [t.name for t in sd15.targets("unet", "kohya")]
    assert sorted(seen) == sorted(names)  # every target, once
    assert seen == {name: expected_tokens(name, height, width) for name in names}


def test_unet_tokens_at_512_px() -> None:
    seen = sd15.unet_tokens()
    by_shape = Counter(
        (t.out_features, t.in_features, seen[t.name]) for t in sd15.targets("unet", "kohya")
    )
    # 5 transformers at 16 × 16 (down 2, up 1), each with 8 1280×1280 targets, and the mid block
    assert by_shape[(1280, 1280, 256)] == 40 and by_shape[(1280, 1280, 64)] == 8
    assert {tokens for (m, n, tokens) in by_shape if (m, n) == (1280, 1280)} == {64, 256}
    assert by_shape[(320, 320, 4096)] == 40 and by_shape[(10240, 1280, 256)] == 5
    diffusers = sd15.unet_tokens(target_set="diffusers")
    assert len(diffusers) == 128 and sorted(set(diffusers.values())) == [64, 77, 256, 1024, 4096]


def test_unet_tokens_leaves_no_hooks_and_checks_its_size() -> None:
    sd15.unet_tokens(64, 64)
    unet = sd15._meta_model("unet")
    assert not any(m._forward_hooks for m in unet.modules())
    for height, width in [(500, 512), (512, 0), (32, 64)]:
        with pytest.raises(ValueError, match="multiples of 64"):
            sd15.unet_tokens(height, width)


# ---------------------------------------------------------------------------------------------
# the random-weight pipeline's parts (the full-size build itself is rehearsed: make rehearse)
# ---------------------------------------------------------------------------------------------


def test_vae_and_scheduler_configs_are_sd15s() -> None:
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler

    with torch.device("meta"):
        vae = AutoencoderKL(**sd15.VAE_CONFIG)
    assert n_params(vae) == sd15.VAE_PARAMS == 83_653_863
    scheduler = PNDMScheduler(**sd15.SCHEDULER_CONFIG)
    assert scheduler.config.beta_schedule == "scaled_linear" and scheduler.config.steps_offset == 1


def test_the_stand_in_tokenizer_reads_any_lowercase_prompt() -> None:
    tokenizer = sd15.stand_in_tokenizer()
    assert tokenizer.model_max_length == 77
    for prompt in ["a photo of sks dog", "a zebra quietly jumps over the lazy fox"]:
        ids = tokenizer(prompt).input_ids
        assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
        assert max(ids) < sd15.TEXT_ENCODER_CONFIG["vocab_size"]
        assert tokenizer.decode(ids[1:-1]) == prompt
    assert len(tokenizer("a photo of sks dog").input_ids) == 7  # one token a word
