"""lokr_edu against the real libraries, installed from PyPI: peft, lycoris-lora and diffusers.

Each test puts the same factor values into both implementations and compares outputs (fp32,
relative error ≤ 1e-5), or has one library write a file that the other reads.
"""

from __future__ import annotations

import logging

import pytest
import torch
from lycoris import create_lycoris
from lycoris.kohya import create_network, create_network_from_weights
from peft import LoHaConfig, LoKrConfig, LoraConfig, get_peft_model
from tiny_sd import outputs, randomize_adapters, tiny_pipeline
from torch import nn

from lokr_edu.adapters import adapter_layers, inject
from lokr_edu.io import load_adapter, save_adapter

logging.getLogger("LyCORIS").setLevel(logging.ERROR)

# (layer factory, input shape): prime and non-square dims, Linear and Conv2d 1×1 / 3×3
LAYERS = [
    (lambda: nn.Linear(13, 7), (3, 13)),
    (lambda: nn.Linear(64, 96), (2, 5, 64)),
    (lambda: nn.Conv2d(12, 20, 1), (2, 12, 4, 4)),
    (lambda: nn.Conv2d(8, 16, 3, padding=1), (2, 8, 5, 5)),
]
PEFT_CONFIGS = {
    "lora": lambda r, a: LoraConfig(r=r, lora_alpha=a, target_modules=["0"]),
    "loha": lambda r, a: LoHaConfig(r=r, alpha=a, target_modules=["0"]),
    "lokr": lambda r, a: LoKrConfig(r=r, alpha=a, target_modules=["0"]),
}


def relative_error(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return ((ours - theirs).norm() / theirs.norm()).item()


def pair(layer_index: int, method: str, rank: int, alpha: float):
    """(our model, peft's model, input) with the same base weights and the same factors."""
    build, shape = LAYERS[layer_index]
    torch.manual_seed(layer_index)
    base = nn.Sequential(build())
    ours = nn.Sequential(build())
    ours.load_state_dict(base.state_dict())
    peft_model = get_peft_model(base, PEFT_CONFIGS[method](rank, alpha))
    inject(ours, "0", method, rank=rank, alpha=alpha)
    randomize_adapters(ours)
    peft_layer = peft_model.base_model.model[0]
    with torch.no_grad():
        for name, value in ours[0].adapters["default"].named_parameters():
            store = getattr(
                peft_layer,
                name
                if name.startswith(("hada", "lokr"))
                else {"lora_down": "lora_A", "lora_up": "lora_B"}[name],
            )
            target = store["default"]
            target = target.weight if isinstance(target, nn.Module) else target
            target.copy_(value.reshape(target.shape))
    return ours, peft_model, torch.randn(shape, generator=torch.Generator().manual_seed(9))


@pytest.mark.parametrize("layer_index", range(len(LAYERS)))
@pytest.mark.parametrize("method", ["lora", "loha"])
def test_lora_and_loha_match_peft(layer_index: int, method: str) -> None:
    ours, theirs, x = pair(layer_index, method, rank=2, alpha=3.0)
    with torch.no_grad():
        assert relative_error(ours(x), theirs(x)) <= 1e-5


@pytest.mark.parametrize("layer_index", [0, 1, 3])
def test_lokr_matches_peft_when_a_factor_is_low_rank(layer_index: int) -> None:
    # r = 1 keeps W2 low-rank on every shape here, so both libraries scale by α/r
    ours, theirs, x = pair(layer_index, "lokr", rank=1, alpha=3.0)
    assert any(n.startswith("lokr_w2_") for n, _ in ours[0].adapters["default"].named_parameters())
    with torch.no_grad():
        assert relative_error(ours(x), theirs(x)) <= 1e-5


def test_lokr_differs_from_peft_by_alpha_over_r_when_both_factors_are_full() -> None:
    """A difference of convention: with W1 and W2 both full there is no rank in ΔW, and
    LyCORIS (so lokr_edu) uses scale 1 and ignores α; peft still multiplies by α/r."""
    ours, theirs, x = pair(1, "lokr", rank=8, alpha=2.0)  # 8 ≥ max(c, d)/2: W2 full
    assert {n for n, _ in ours[0].adapters["default"].named_parameters()} == {"lokr_w1", "lokr_w2"}
    ours_delta = ours[0].adapters["default"].delta_weight()
    peft_delta = theirs.base_model.model[0].get_delta_weight("default")
    assert torch.allclose(peft_delta, (2.0 / 8) * ours_delta, atol=1e-6)


def test_lokr_factorization_differs_from_peft_when_factor_divides_and_exceeds_sqrt() -> None:
    """peft returns (factor, dim/factor) unsorted; LyCORIS and lokr_edu put the smaller first."""
    from peft.tuners.lokr.layer import factorization

    from lokr_edu.kron import factorize

    assert factorization(64, 16) == (16, 4) and factorize(64, 16) == (4, 16)


def test_peft_and_lokr_edu_both_start_at_zero_but_zero_different_factors() -> None:
    base = nn.Sequential(nn.Linear(16, 16))
    peft_model = get_peft_model(
        base, LoKrConfig(r=2, alpha=2, target_modules=["0"], init_weights=True)
    )
    peft_layer = peft_model.base_model.model[0]
    assert torch.count_nonzero(peft_layer.get_delta_weight("default")) == 0
    ours = nn.Sequential(nn.Linear(16, 16))
    inject(ours, "0", "lokr", rank=2)
    zero_ours = {
        n for n, p in ours[0].adapters["default"].named_parameters() if torch.count_nonzero(p) == 0
    }
    zero_peft = {
        n
        for n in ["lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b"]
        if "default" in getattr(peft_layer, n)
        and torch.count_nonzero(getattr(peft_layer, n)["default"]) == 0
    }
    assert zero_ours == {"lokr_w2"}  # LyCORIS: W2 starts at zero, W1 random
    assert zero_peft == {"lokr_w1"}  # peft: W1 starts at zero, W2 random


def test_a_generic_lycoris_network_loads_our_values_and_matches() -> None:
    torch.manual_seed(0)
    ours = nn.Sequential(nn.Linear(64, 48), nn.GELU(), nn.Linear(48, 20))
    reference = nn.Sequential(nn.Linear(64, 48), nn.GELU(), nn.Linear(48, 20))
    reference.load_state_dict(ours.state_dict())
    inject(ours, ["0", "2"], "lokr", rank=4, alpha=2.0)
    randomize_adapters(ours)
    network = create_lycoris(reference, 1.0, linear_dim=4, linear_alpha=2.0, algo="lokr")
    network.apply_to()
    with torch.no_grad():
        for (_, layer), module in zip(adapter_layers(ours), network.loras, strict=True):
            for name, value in layer.adapters["default"].named_parameters():
                getattr(module, name).copy_(value)
        x = torch.randn(4, 64)
        assert relative_error(ours(x), reference(x)) <= 1e-5


def lycoris_network(pipe, algo: str):
    # preset "attn-mlp": transformer blocks and the text encoder's attention and MLP. (The
    # default "full" preset of lycoris-lora 4.1.3 lists the class TimestepEmbedding and the names
    # time_embedding.linear_1/2, wraps them twice on a diffusers U-Net and stops with
    # "duplicated lora name".)
    network = create_network(
        1.0, 4, 2.0, pipe.vae, pipe.text_encoder, pipe.unet, algo=algo, preset="attn-mlp"
    )
    network.apply_to(pipe.text_encoder, pipe.unet, apply_text_encoder=True, apply_unet=True)
    randomize_adapters(network)
    return network


@pytest.mark.parametrize("algo", ["lora", "loha", "lokr"])
def test_a_file_saved_by_lycoris_loads_with_the_same_outputs(tmp_path, algo: str) -> None:
    pipe = tiny_pipeline()
    network = lycoris_network(pipe, algo)
    expected = outputs(pipe)  # lycoris's own forward
    network.save_weights(str(tmp_path / "lycoris.safetensors"), torch.float32, None)
    fresh = tiny_pipeline()
    wrapped = load_adapter(fresh, tmp_path / "lycoris.safetensors")
    assert len(wrapped) == len(network.loras)
    for ours, theirs in zip(outputs(fresh), expected, strict=True):
        assert relative_error(ours, theirs) <= 1e-5


@pytest.mark.parametrize("method", ["lora", "loha", "lokr"])
def test_a_file_saved_by_lokr_edu_loads_into_lycoris_with_the_same_outputs(
    tmp_path, method
) -> None:
    pipe = tiny_pipeline()
    inject(
        pipe.unet,
        ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "ff.net.2"],
        method,
        rank=4,
        alpha=2.0,
    )
    inject(pipe.text_encoder, ["q_proj", "v_proj", "fc1"], method, rank=4, alpha=2.0)
    randomize_adapters(pipe.unet, pipe.text_encoder)
    expected = outputs(pipe)
    # lycoris-lora 4 matches text-encoder keys against the transformers-5 module paths
    path = save_adapter(pipe, tmp_path / "ours.safetensors", text_model_keys=False)
    fresh = tiny_pipeline()
    network, _ = create_network_from_weights(
        1.0, str(path), fresh.vae, fresh.text_encoder, fresh.unet
    )
    network.apply_to(fresh.text_encoder, fresh.unet, apply_text_encoder=True, apply_unet=True)
    network.load_weights(str(path))
    for ours, theirs in zip(outputs(fresh), expected, strict=True):
        assert relative_error(theirs, ours) <= 1e-5


def test_diffusers_load_lora_weights_reads_our_peft_file(tmp_path) -> None:
    pipe = tiny_pipeline()
    inject(pipe.unet, ["to_q", "to_k", "to_v", "to_out.0"], "lora", rank=4, alpha=2.0)
    inject(pipe.text_encoder, ["q_proj", "k_proj", "v_proj", "out_proj"], "lora", rank=2, alpha=4.0)
    randomize_adapters(pipe.unet, pipe.text_encoder)
    expected = outputs(pipe)
    path = save_adapter(pipe, tmp_path / "pytorch_lora_weights.safetensors", format="peft")
    fresh = tiny_pipeline()
    base = outputs(fresh)
    fresh.load_lora_weights(str(path))
    for ours, theirs, untouched in zip(expected, outputs(fresh), base, strict=True):
        assert relative_error(theirs, ours) <= 1e-5
        assert relative_error(untouched, ours) > 1e-3  # the adapter really changed something


def test_diffusers_reads_our_kohya_lora_file_too(tmp_path) -> None:
    pipe = tiny_pipeline()
    inject(pipe.unet, ["to_q", "to_k", "to_v", "to_out.0"], "lora", rank=4, alpha=2.0)
    randomize_adapters(pipe.unet)
    expected = outputs(pipe)
    path = save_adapter(pipe, tmp_path / "kohya.safetensors")
    fresh = tiny_pipeline()
    fresh.load_lora_weights(str(path))
    assert relative_error(outputs(fresh)[1], expected[1]) <= 1e-5
