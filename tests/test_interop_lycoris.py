"""lokr_edu against lycoris-lora (installed from PyPI): files written by one load in the other.

lycoris-lora networks are created, randomized and saved with its own API on a tiny SD-shaped
pipeline (tests/tiny_sd.py): `lycoris.kohya.create_network` (what kohya sd-scripts calls; one
file with lora_unet_* and lora_te_* keys) and `lycoris.create_lycoris` (the generic wrapper:
one network, one prefix per model). `load_adapter` must then give the outputs lycoris-lora's own
forward gave (fp32, relative error ≤ 1e-5); and files written by `save_adapter` must load into
lycoris-lora (`create_network_from_weights`, `create_lycoris_from_weights`) with lokr_edu's
outputs. Differences from lycoris-lora 4.1.3 that the tests state:
- its default preset "full" cannot wrap a diffusers U-Net (test_lycoris_full_preset_...), and
  `create_network_from_weights` builds with the current preset, so a working one is applied
  first (lycoris_from_file);
- on a transformers-5 CLIPTextModel it matches `lora_te_<module path>`, so it silently skips
  the `lora_te_text_model_*` keys that SD1.5 files (and save_adapter by default) use; load_adapter
  reads both (test_lycoris_skips_text_encoder_keys_spelled_with_text_model);
- DoRA (dora_wd) files hold a dora_scale tensor, which load_adapter refuses
  (test_a_lycoris_dora_file_is_refused_and_nothing_changes).
"""

from __future__ import annotations

import logging

import pytest
import toml
import torch
from lycoris import LycorisNetwork, create_lycoris, create_lycoris_from_weights
from lycoris.kohya import LycorisNetworkKohya, create_network, create_network_from_weights
from tiny_sd import outputs, randomize_adapters, tiny_pipeline
from torch import nn

from lokr_edu.adapters import inject
from lokr_edu.io import load_adapter, save_adapter

logging.getLogger("LyCORIS").setLevel(logging.ERROR)

# Attention, MLP, ResNet (3×3 convs, 1×1 shortcuts, time projections), up/down samplers,
# conv_in / conv_out and the time embedding; the text encoder's attention and MLP. This is
# lycoris-lora's "full" preset without its TimestepEmbedding entry (see the test below).
SD_PRESET = {
    "enable_conv": True,
    "unet_target_module": ["Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D"],
    "unet_target_name": [
        "conv_in",
        "conv_out",
        "time_embedding.linear_1",
        "time_embedding.linear_2",
    ],
    "text_encoder_target_module": ["CLIPAttention", "CLIPMLP"],
    "text_encoder_target_name": [],
}
# algo and options: each LoKr layout (W1 / W2 full or low-rank, another factor)
ALGOS = {
    "lora": {"algo": "lora"},
    "loha": {"algo": "loha"},
    "lokr": {"algo": "lokr"},
    "lokr decompose_both": {"algo": "lokr", "decompose_both": True},
    "lokr full_matrix": {"algo": "lokr", "full_matrix": True},
    "lokr factor 4": {"algo": "lokr", "factor": 4},
}


@pytest.fixture(autouse=True)
def restore_lycoris_presets():
    """lycoris-lora keeps presets in class attributes; put them back after every test."""
    saved = {
        cls: {k: v for k, v in vars(cls).items() if k.isupper()}
        for cls in (LycorisNetwork, LycorisNetworkKohya)
    }
    yield
    for cls, attributes in saved.items():
        for key, value in attributes.items():
            setattr(cls, key, value)


def preset_file(tmp_path, preset: dict) -> str:
    path = tmp_path / "preset.toml"
    path.write_text(toml.dumps(preset))
    return str(path)


def relative_error(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return ((ours - theirs).norm() / theirs.norm()).item()


def assert_same_outputs(ours, theirs) -> None:
    for a, b in zip(ours, theirs, strict=True):
        assert relative_error(a, b) <= 1e-5


# ---------------------------------------------------------------------------------------------
# lycoris-lora writes, lokr_edu reads
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ALGOS)
def test_a_kohya_network_file_saved_by_lycoris_loads_with_the_same_outputs(tmp_path, variant):
    pipe = tiny_pipeline()
    base = outputs(pipe)
    network = create_network(
        1.0,
        4,  # linear rank, α 2
        2.0,
        pipe.vae,
        pipe.text_encoder,
        pipe.unet,
        conv_dim=2,  # 3×3 convs: rank 2, α 1
        conv_alpha=1.0,
        preset=preset_file(tmp_path, SD_PRESET),
        **ALGOS[variant],
    )
    network.apply_to(pipe.text_encoder, pipe.unet, apply_text_encoder=True, apply_unet=True)
    randomize_adapters(network)
    expected = outputs(pipe)  # lycoris-lora's own forward
    network.save_weights(str(tmp_path / "lycoris.safetensors"), torch.float32, None)

    fresh = tiny_pipeline()
    wrapped = load_adapter(fresh, tmp_path / "lycoris.safetensors")
    assert len(wrapped) == len(network.loras) == 95
    assert "unet.down_blocks.0.resnets.0.conv1" in wrapped  # a 3×3 conv
    assert "text_encoder.encoder.layers.0.mlp.fc2" in wrapped
    assert_same_outputs(outputs(fresh), expected)
    assert all(relative_error(a, b) > 1e-3 for a, b in zip(expected, base, strict=True))


def test_generic_networks_saved_by_lycoris_load_into_a_pipeline(tmp_path) -> None:
    """`create_lycoris` on the U-Net and on the text encoder, each with the kohya prefix in
    its preset: two files, loaded one after the other into one pipeline."""
    pipe = tiny_pipeline()
    parts = [
        ("unet", pipe.unet, "lora_unet", ["Transformer2DModel", "ResnetBlock2D"]),
        ("text_encoder", pipe.text_encoder, "lora_te", ["CLIPAttention", "CLIPMLP"]),
    ]
    for part, model, prefix, modules in parts:
        preset = {"enable_conv": True, "target_module": modules, "lora_prefix": prefix}
        network = create_lycoris(
            model,
            1.0,
            linear_dim=4,
            linear_alpha=2.0,
            algo="lokr",
            preset=preset_file(tmp_path, preset),
        )
        network.apply_to()
        randomize_adapters(network)
        network.save_weights(str(tmp_path / f"{part}.safetensors"), torch.float32, None)
    expected = outputs(pipe)

    fresh = tiny_pipeline()
    unet_layers = load_adapter(fresh, tmp_path / "unet.safetensors")
    text_layers = load_adapter(fresh, tmp_path / "text_encoder.safetensors")  # lora_te_encoder_*
    assert all(n.startswith("unet.") for n in unet_layers)
    assert all(n.startswith("text_encoder.") for n in text_layers)
    assert_same_outputs(outputs(fresh), expected)


@pytest.mark.parametrize("algo", ["lora", "loha", "lokr"])
def test_a_generic_module_file_goes_both_ways(tmp_path, algo: str) -> None:
    """A plain nn.Module: lycoris-lora names its layers lycoris_<path>, as save_adapter does."""

    def model() -> nn.Sequential:
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 12, 3), nn.ReLU(), nn.Flatten(), nn.Linear(108, 10))

    x = torch.randn(2, 3, 5, 5, generator=torch.Generator().manual_seed(1))
    theirs = model()
    network = create_lycoris(theirs, 1.0, linear_dim=2, linear_alpha=1.0, algo=algo, preset="full")
    network.apply_to()
    randomize_adapters(network)
    network.save_weights(str(tmp_path / "lycoris.safetensors"), torch.float32, None)
    ours = model()
    assert load_adapter(ours, tmp_path / "lycoris.safetensors") == ["0", "3"]
    with torch.no_grad():
        assert relative_error(ours(x), theirs(x)) <= 1e-5

        path = save_adapter(ours, tmp_path / "ours.safetensors")
        again = model()
        loaded, _ = create_lycoris_from_weights(1.0, str(path), again)
        loaded.apply_to()
        assert len(loaded.loras) == 2
        assert relative_error(again(x), ours(x)) <= 1e-5


# ---------------------------------------------------------------------------------------------
# lokr_edu writes, lycoris-lora reads
# ---------------------------------------------------------------------------------------------


def lycoris_from_file(path) -> tuple[object, object, dict]:
    """(pipeline, network, load report): lycoris-lora's kohya loader on a fresh tiny pipeline.

    create_network_from_weights first builds an empty network with the class's current preset;
    with the default "full" preset that stops on a diffusers U-Net (see
    test_lycoris_full_preset_cannot_wrap_a_diffusers_unet), so SD_PRESET is applied first."""
    LycorisNetworkKohya.apply_preset(SD_PRESET)
    pipe = tiny_pipeline()
    network, _ = create_network_from_weights(1.0, str(path), pipe.vae, pipe.text_encoder, pipe.unet)
    network.apply_to(pipe.text_encoder, pipe.unet, apply_text_encoder=True, apply_unet=True)
    return pipe, network, network.load_weights(str(path))


def adapted_pipeline(method: str, **options):
    pipe = tiny_pipeline()
    targets = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "ff.net.2", "time_emb_proj"]
    inject(pipe.unet, targets, method, rank=4, alpha=2.0, **options)
    inject(pipe.unet, ["resnets.0.conv1", "resnets.0.conv2"], method, rank=2, alpha=1.0, **options)
    inject(pipe.text_encoder, ["q_proj", "v_proj", "fc1"], method, rank=4, alpha=2.0, **options)
    randomize_adapters(pipe.unet, pipe.text_encoder)
    return pipe


@pytest.mark.parametrize(
    ("method", "options"),
    [
        ("lora", {}),
        ("loha", {}),
        ("lokr", {}),
        ("lokr", {"decompose_both": True}),
        ("lokr", {"full_matrix": True}),
        ("lokr", {"factor": 4}),
    ],
)
def test_a_file_saved_by_lokr_edu_loads_into_lycoris_with_the_same_outputs(
    tmp_path, method, options
) -> None:
    pipe = adapted_pipeline(method, **options)
    expected = outputs(pipe)
    # lycoris-lora 4 matches text-encoder keys against the transformers-5 module paths
    path = save_adapter(pipe, tmp_path / "ours.safetensors", text_model_keys=False)
    fresh, network, report = lycoris_from_file(path)
    assert report == {}  # no missing, no unexpected keys
    assert len(network.text_encoder_loras) == 6 and len(network.unet_loras) > 0
    assert_same_outputs(outputs(fresh), expected)


def test_lycoris_skips_text_encoder_keys_spelled_with_text_model(tmp_path) -> None:
    """A difference: SD1.5 files spell text-encoder layers `lora_te_text_model_encoder_...`
    (transformers 4 paths), save_adapter's default. lycoris-lora 4.1.3 matches keys against a
    transformers-5 CLIPTextModel's own paths (no `text_model.`), finds none, and applies the
    U-Net part only: no error, the text-encoder keys are only listed as "unexpected keys" in
    what load_weights returns. load_adapter reads both spellings."""
    pipe = adapted_pipeline("lokr")
    expected = outputs(pipe)
    path = save_adapter(pipe, tmp_path / "sd15_spelling.safetensors")
    base = outputs(tiny_pipeline())
    fresh, network, report = lycoris_from_file(path)
    assert network.text_encoder_loras == [] and len(network.unet_loras) > 0
    skipped = {key.partition(".")[0] for key in report["unexpected keys"]}
    assert len(skipped) == 6 and all(k.startswith("lora_te_text_model_") for k in skipped)
    assert torch.equal(outputs(fresh)[0], base[0])  # the text encoder is unchanged

    ours = tiny_pipeline()
    load_adapter(ours, path)
    assert_same_outputs(outputs(ours), expected)


def test_lycoris_full_preset_cannot_wrap_a_diffusers_unet() -> None:
    """lycoris-lora 4.1.3's default preset "full" lists the class TimestepEmbedding and also
    the names time_embedding.linear_1 / linear_2, so it wraps those layers twice on a diffusers
    U-Net and stops. The tests use SD_PRESET, the same list without TimestepEmbedding."""
    pipe = tiny_pipeline()
    with pytest.raises(AssertionError, match="duplicated lora name: lora_unet_time_embedding"):
        create_network(1.0, 4, 2.0, pipe.vae, pipe.text_encoder, pipe.unet, algo="lokr")


def test_a_lycoris_dora_file_is_refused_and_nothing_changes(tmp_path) -> None:
    pipe = tiny_pipeline()
    network = create_network(
        1.0,
        4,
        2.0,
        pipe.vae,
        pipe.text_encoder,
        pipe.unet,
        algo="lokr",
        dora_wd=True,
        preset=preset_file(tmp_path, SD_PRESET),
    )
    network.apply_to(pipe.text_encoder, pipe.unet, apply_text_encoder=True, apply_unet=True)
    network.save_weights(str(tmp_path / "dora.safetensors"), torch.float32, None)
    fresh = tiny_pipeline()
    before = [
        {k: v.clone() for k, v in m.state_dict().items()} for m in (fresh.unet, fresh.text_encoder)
    ]
    with pytest.raises(ValueError, match=r"dora_scale is DoRA's weight decomposition \(dora_wd\)"):
        load_adapter(fresh, tmp_path / "dora.safetensors")
    for state, model in zip(before, (fresh.unet, fresh.text_encoder), strict=True):
        now = model.state_dict()
        assert now.keys() == state.keys() and all(torch.equal(state[k], now[k]) for k in now)
