"""save_adapter / load_adapter: round trips for every method and format, and every refusal.

Each refusal is checked for its message and for leaving the model exactly as it was (module
tree, every tensor, every requires_grad flag). The libraries' side (peft, lycoris-lora,
diffusers reading and writing these files) is in tests/test_interop_*.py.
"""

from __future__ import annotations

import json
import math
import pickle
import re

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tiny_sd import outputs, randomize_adapters, tiny_pipeline
from torch import nn

import lokr_edu
import lokr_edu.io as io
from lokr_edu.adapters import adapter_layers, inject, merge, set_strength, unmerge
from lokr_edu.io import load_adapter, save_adapter


def network() -> nn.Sequential:
    """Conv 3×3, Conv 1×1 and Linear (13 outputs: a prime), with fixed weights."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(4, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 1),
        nn.Flatten(),
        nn.Linear(200, 13),
    )


X = torch.randn(2, 4, 5, 5, generator=torch.Generator().manual_seed(0))
LAYERS = ["0", "2", "4"]
VARIANTS = [
    ("lora", {}, "kohya"),
    ("lora", {}, "peft"),
    ("loha", {}, "kohya"),
    ("lokr", {}, "kohya"),
    ("lokr", {"decompose_both": True}, "kohya"),
    ("lokr", {"full_matrix": True}, "kohya"),
    ("lokr", {"factor": 2}, "kohya"),
]


def adapted(method: str = "lora", options: dict | None = None, std: float = 0.1) -> nn.Sequential:
    model = network()
    inject(model, LAYERS, method, rank=2, alpha=3.0, **(options or {}))
    randomize_adapters(model, std=std)
    return model


def fingerprint(*models: nn.Module) -> list[object]:
    """Everything load_adapter could change: module tree, tensors, requires_grad flags."""
    return [
        (
            [(n, type(m).__name__) for n, m in model.named_modules()],
            {k: v.clone() for k, v in model.state_dict().items()},
            {n: p.requires_grad for n, p in model.named_parameters()},
        )
        for model in models
    ]


def assert_unchanged(before: list[object], *models: nn.Module) -> None:
    for (tree, state, grads), (tree_now, state_now, grads_now) in zip(
        before, fingerprint(*models), strict=True
    ):
        assert tree_now == tree and grads_now == grads
        assert state_now.keys() == state.keys()
        assert all(torch.equal(state[k], v) for k, v in state_now.items())


def rewrite(tmp_path, source, change) -> object:
    """A copy of the safetensors file `source` with `change(tensors)` applied."""
    tensors = load_file(str(source))
    change(tensors)
    path = tmp_path / "changed.safetensors"
    save_file(tensors, str(path))
    return path


# ---------------------------------------------------------------------------------------------
# round trips
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("method", "options", "format"), VARIANTS)
def test_round_trip_gives_the_same_outputs(tmp_path, method, options, format) -> None:
    model = adapted(method, options)
    path = save_adapter(model, tmp_path / "adapter.safetensors", format=format)
    fresh = network()
    assert load_adapter(fresh, path) == LAYERS
    with torch.no_grad():
        assert torch.allclose(fresh(X), model(X), atol=1e-6)
    layers = dict(adapter_layers(fresh))
    for name, layer in adapter_layers(model):
        ours, theirs = layers[name].adapters["default"], layer.adapters["default"]
        assert ours.method == theirs.method and ours.keys == theirs.keys
        assert ours.alpha.item() == theirs.alpha.item()
    trainable = [n for n, p in fresh.named_parameters() if p.requires_grad]
    assert trainable and all(".adapters." in n for n in trainable)


@pytest.mark.parametrize(
    ("method", "format"),
    [("lora", "kohya"), ("lora", "peft"), ("loha", "kohya"), ("lokr", "kohya")],
)
def test_pipeline_round_trip(tmp_path, method, format) -> None:
    pipe = tiny_pipeline()
    inject(pipe.unet, ["to_q", "to_k", "to_v", "to_out.0", "proj_in"], method, rank=4, alpha=2.0)
    inject(pipe.unet, ["resnets.0.conv1"], method, rank=2, alpha=1.0)  # 3×3 convs
    inject(pipe.text_encoder, ["q_proj", "v_proj", "fc1"], method, rank=2)
    randomize_adapters(pipe.unet, pipe.text_encoder)
    path = lokr_edu.save_adapter(pipe, tmp_path / "a.safetensors", format=format)
    fresh = tiny_pipeline()
    base = outputs(fresh)
    names = lokr_edu.load_adapter(fresh, path)
    assert "unet.down_blocks.0.resnets.0.conv1" in names
    assert "text_encoder.encoder.layers.1.mlp.fc1" in names
    for ours, theirs, untouched in zip(outputs(fresh), outputs(pipe), base, strict=True):
        assert torch.allclose(ours, theirs, atol=1e-5)
        assert not torch.allclose(ours, untouched, atol=1e-3)


def test_loading_into_a_model_that_has_the_adapter_overwrites_its_values(tmp_path) -> None:
    model = adapted("lokr")
    path = save_adapter(model, tmp_path / "a.safetensors")
    other = adapted("lokr", std=0.5)
    set_strength(other, 0.5)
    load_adapter(other, path)
    set_strength(other, 1.0)
    with torch.no_grad():
        assert torch.allclose(other(X), model(X), atol=1e-6)
    load_adapter(other, path, name="second")  # a second adapter next to the first
    assert set(other[0].adapters) == {"default", "second"}


def test_loading_into_a_merged_adapter_keeps_it_merged_with_the_new_values(tmp_path) -> None:
    model = adapted("loha")
    path = save_adapter(model, tmp_path / "a.safetensors")
    other = adapted("loha", std=0.5)
    base_weight = other[4].base.weight.clone()
    merge(other)
    load_adapter(other, path)
    assert "default" in other[4].merged
    with torch.no_grad():
        assert torch.allclose(other(X), model(X), atol=1e-5)
    unmerge(other)
    assert torch.allclose(other[4].base.weight, base_weight, atol=1e-6)


@pytest.mark.parametrize("stored", ["zero", "absent"])
def test_an_alpha_of_zero_or_none_means_alpha_equals_r(tmp_path, stored) -> None:
    model = network()
    inject(model, LAYERS, "lora", rank=2)  # alpha None: α = r = 2, scale 1
    randomize_adapters(model)
    path = save_adapter(model, tmp_path / "a.safetensors")

    def change(tensors: dict) -> None:
        for key in [k for k in tensors if k.endswith(".alpha")]:
            if stored == "zero":
                tensors[key] = torch.tensor(0.0)
            else:
                del tensors[key]

    fresh = network()
    load_adapter(fresh, rewrite(tmp_path, path, change))
    assert fresh[0].adapters["default"].alpha.item() == 2.0
    with torch.no_grad():
        assert torch.allclose(fresh(X), model(X), atol=1e-6)


def test_float16_files_load_into_a_float32_model(tmp_path) -> None:
    model = adapted("lokr")
    path = save_adapter(model, tmp_path / "a.safetensors", dtype=torch.float16)
    with safe_open(str(path), framework="pt") as f:
        assert f.get_tensor("lycoris_0.lokr_w1").dtype == torch.float16
    fresh = network()
    load_adapter(fresh, path)
    assert fresh[0].adapters["default"].lokr_w1.dtype == torch.float32
    with torch.no_grad():
        assert torch.allclose(fresh(X), model(X), rtol=1e-2, atol=1e-3)


# ---------------------------------------------------------------------------------------------
# what a file holds
# ---------------------------------------------------------------------------------------------


def test_file_records_method_rank_alpha_targets_and_base_model(tmp_path) -> None:
    path = save_adapter(adapted("loha"), tmp_path / "a.safetensors", base_model="toy-cnn")
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
        assert sorted(f.keys()) == sorted(
            f"lycoris_{i}.{t}"
            for i in (0, 2, 4)
            for t in ["hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"]
        )
    assert metadata == {
        "lokr_edu.format": "kohya",
        "lokr_edu.method": "loha",
        "lokr_edu.rank": "[2]",
        "lokr_edu.alpha": "[3.0]",
        "lokr_edu.targets": '["0", "2", "4"]',
        "lokr_edu.base_model": "toy-cnn",
    }


def test_peft_file_records_lora_config_as_diffusers_does(tmp_path) -> None:
    pipe = tiny_pipeline()
    inject(pipe.unet, ["to_q", "to_k"], "lora", rank=4, alpha=8.0)
    inject(pipe.unet, ["attn1.to_v"], "lora", rank=2, alpha=1.0)
    inject(pipe.text_encoder, ["q_proj"], "lora", rank=2)
    path = save_adapter(pipe, tmp_path / "a.safetensors", format="peft")
    with safe_open(str(path), framework="pt") as f:
        keys, metadata = set(f.keys()), f.metadata()
    assert "unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight" in keys
    assert "text_encoder.encoder.layers.0.self_attn.q_proj.lora_B.weight" in keys
    config = json.loads(metadata["lora_adapter_metadata"])
    assert config["unet.r"] == 4 and config["unet.lora_alpha"] == 8.0
    assert config["unet.rank_pattern"] == {
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_v": 2,
        "up_blocks.1.attentions.0.transformer_blocks.0.attn1.to_v": 2,
        "up_blocks.1.attentions.1.transformer_blocks.0.attn1.to_v": 2,
        "mid_block.attentions.0.transformer_blocks.0.attn1.to_v": 2,
    }
    assert set(config["unet.alpha_pattern"].values()) == {1.0}
    assert config["text_encoder.r"] == 2 and config["text_encoder.lora_alpha"] == 2.0
    assert metadata["format"] == "pt" and metadata["lokr_edu.method"] == "lora"
    assert json.loads(metadata["lokr_edu.targets"])[0].startswith("unet.")


def test_pipeline_keys_follow_kohya_and_both_text_encoder_spellings_load(tmp_path) -> None:
    pipe = tiny_pipeline()
    inject(pipe.unet, ["to_q"], "lora", rank=2)
    inject(pipe.text_encoder, ["q_proj"], "lora", rank=2)
    randomize_adapters(pipe.unet, pipe.text_encoder)
    sd15 = save_adapter(pipe, tmp_path / "sd15.safetensors")  # transformers 4 / A1111 spelling
    own = save_adapter(pipe, tmp_path / "own.safetensors", text_model_keys=False)
    with safe_open(str(sd15), framework="pt") as f:
        keys = set(f.keys())
    assert (
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight"
        in keys
    )
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha" in keys
    with safe_open(str(own), framework="pt") as f:
        assert "lora_te_encoder_layers_0_self_attn_q_proj.alpha" in set(f.keys())
    for path in (sd15, own):
        fresh = tiny_pipeline()
        load_adapter(fresh, path)
        for ours, theirs in zip(outputs(fresh), outputs(pipe), strict=True):
            assert torch.allclose(ours, theirs, atol=1e-5)


def test_kohya_lora_keys_are_those_diffusers_converts_peft_keys_to(tmp_path) -> None:
    """diffusers' own peft -> kohya conversion (`convert_state_dict_to_kohya`) as the reference
    for a LoRA's kohya file: the same keys and tensors, alpha = r (diffusers writes r, since a
    peft state dict holds no α). One spelling differs by design: diffusers names the text encoder
    lora_te1_ (SDXL's first of two), SD1.5 files name it lora_te_ (kohya sd-scripts, A1111)."""
    from diffusers.utils import convert_state_dict_to_kohya

    pipe = tiny_pipeline()
    inject(pipe.unet, ["to_q", "to_k", "to_v", "to_out.0", "proj_in"], "lora", rank=2)
    inject(pipe.text_encoder, ["q_proj", "out_proj", "fc1"], "lora", rank=2)
    randomize_adapters(pipe.unet, pipe.text_encoder)
    peft = load_file(str(save_adapter(pipe, tmp_path / "peft.safetensors", format="peft")))
    reference = {
        key.replace("lora_te1_", "lora_te_", 1): value
        for key, value in convert_state_dict_to_kohya(peft).items()
    }
    ours = load_file(str(save_adapter(pipe, tmp_path / "k.safetensors", text_model_keys=False)))
    assert ours.keys() == reference.keys()
    assert any(k.startswith("lora_unet_") for k in ours) and any("_te_" in k for k in ours)
    for key, value in reference.items():
        assert torch.equal(ours[key], value.to(ours[key].dtype)), key


def test_a_unet_alone_loads_the_unet_part_of_a_pipeline_file(tmp_path) -> None:
    pipe = tiny_pipeline()
    inject(pipe.unet, ["to_q"], "lokr", rank=2)
    randomize_adapters(pipe.unet)
    path = save_adapter(pipe, tmp_path / "a.safetensors")
    unet = tiny_pipeline().unet
    assert (
        load_adapter(unet, path)[0] == "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    )


# ---------------------------------------------------------------------------------------------
# atomic writes
# ---------------------------------------------------------------------------------------------


def crash_in_save_file(tensors, filename, metadata=None):
    with open(filename, "wb") as f:
        f.write(b"half a file")
    raise OSError("disk full")


def crash_in_fsync(descriptor):
    raise OSError("I/O error")


@pytest.mark.parametrize(
    ("attribute", "crash", "message"),
    [("save_file", crash_in_save_file, "disk full"), ("os.fsync", crash_in_fsync, "I/O error")],
)
def test_a_crash_while_writing_leaves_the_old_file_intact(
    tmp_path, monkeypatch, attribute, crash, message
) -> None:
    path = save_adapter(adapted("lora"), tmp_path / "a.safetensors")
    before = path.read_bytes()
    monkeypatch.setattr(io if attribute == "save_file" else io.os, attribute.split(".")[-1], crash)
    with pytest.raises(OSError, match=message):
        save_adapter(adapted("loha"), path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["a.safetensors"]  # no temporary left behind


# ---------------------------------------------------------------------------------------------
# refusals: each leaves the model exactly as it was
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".pt", ".bin", ".ckpt", ".pth", ".pkl"])
def test_pickle_files_are_refused_unread(tmp_path, suffix) -> None:
    path = tmp_path / f"adapter{suffix}"
    path.write_bytes(b"\x80\x04 not even opened")
    model = network()
    before = fingerprint(model)
    with pytest.raises(ValueError, match=r"is a pickle file .* can run any code it contains"):
        load_adapter(model, path)
    assert_unchanged(before, model)


@pytest.mark.parametrize(
    ("writer", "message"),
    [
        (lambda p: p.write_bytes(pickle.dumps({"lora_up": [0.0]})), "is a pickle"),
        (lambda p: torch.save({"w": torch.zeros(2)}, p), "is a zip archive, as torch.save"),
    ],
)
def test_a_pickle_named_safetensors_is_refused_by_its_first_bytes(tmp_path, writer, message):
    path = tmp_path / "adapter.safetensors"
    writer(path)
    model = adapted("lora")
    before = fingerprint(model)
    with pytest.raises(ValueError, match=f"{message}.*can run any code"):
        load_adapter(model, path)
    assert_unchanged(before, model)


def test_a_file_that_is_not_safetensors_is_refused(tmp_path) -> None:
    path = tmp_path / "adapter.safetensors"
    path.write_bytes(b"just some text, not a header")
    model = network()
    before = fingerprint(model)
    with pytest.raises(ValueError, match="adapter.safetensors is not a safetensors file"):
        load_adapter(model, path)
    assert_unchanged(before, model)


def test_a_file_without_tensors_is_refused(tmp_path) -> None:
    path = tmp_path / "empty.safetensors"
    save_file({}, str(path), {"lokr_edu.method": "lora"})
    model = network()
    before = fingerprint(model)
    with pytest.raises(ValueError, match="empty.safetensors holds no tensors"):
        load_adapter(model, path)
    assert_unchanged(before, model)


def test_a_header_that_starts_like_a_pickle_is_still_read_as_safetensors(tmp_path) -> None:
    # the first 8 bytes are the header length: 0x80 there is a length, not a pickle mark
    path = tmp_path / "a.safetensors"
    for pad in range(64):
        save_file({"lycoris_4.lora_down.weight": torch.zeros(1, 200)}, str(path), {"p": "x" * pad})
        if path.read_bytes()[0] == 0x80:
            break
    assert path.read_bytes()[0] == 0x80
    tensors, metadata = io.read_safetensors(path)
    assert tensors["lycoris_4.lora_down.weight"].shape == (1, 200) and "p" in metadata


@pytest.mark.parametrize("existing", [None, "lora"], ids=["fresh model", "adapted model"])
@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            lambda t: t.update({"lycoris_9.lora_down.weight": torch.zeros(2, 8)}),
            r"key 'lycoris_9.lora_down.weight' names no nn.Linear / nn.Conv2d of the target",
        ),
        (
            lambda t: t.update({"lycoris_4.lora_down.weight": torch.zeros(2, 199)}),
            r"key lycoris_4.lora_down.weight has shape \(2, 199\), "
            r"but layer 4 with weight \(13, 200\) needs \(2, 200\)",
        ),
        (
            lambda t: t.update({"lycoris_4.lora_up.weight": torch.zeros(13, 3)}),
            r"key lycoris_4.lora_up.weight has shape \(13, 3\), "
            r"but layer 4 with weight \(13, 200\) needs \(13, 2\)",
        ),
        (
            lambda t: t.pop("lycoris_4.lora_up.weight"),
            r"key lycoris_4.lora_up.weight is missing: layer 4 needs it with shape \(13, 2\)",
        ),
        (
            lambda t: t.update({"lycoris_4.lora_mid.weight": torch.zeros(2, 2)}),
            r"key lycoris_4.lora_mid.weight is a Tucker \(use_tucker\) LoCon core, which "
            "lokr_edu does not implement",
        ),
        (
            lambda t: t.update({"lycoris_4.dora_scale": torch.zeros(13, 1)}),
            r"key lycoris_4.dora_scale is DoRA's weight decomposition",
        ),
        (
            lambda t: t.update({"lycoris_4.hada_w1_a": torch.zeros(13, 2)}),
            r"layer lycoris_4 has tensors of several methods",
        ),
        (
            lambda t: t.update({"lycoris_4.lora_extra": torch.zeros(1)}),
            r"key lycoris_4.lora_extra is not a lora tensor",
        ),
        (
            lambda t: t.update({"lycoris_4.alpha": torch.ones(2)}),
            r"key lycoris_4.alpha has shape \(2,\), but alpha is one number",
        ),
    ],
    ids=[
        "unknown layer",
        "wrong down shape",
        "wrong up shape",
        "missing tensor",
        "tucker",
        "dora",
        "two methods",
        "unknown tensor",
        "alpha not scalar",
    ],
)
def test_a_file_that_does_not_fit_is_refused_and_nothing_changes(
    tmp_path, change, message, existing
) -> None:
    # the offending layer comes last, so layers 0 and 2 pass their checks first
    path = rewrite(tmp_path, save_adapter(adapted("lora"), tmp_path / "a.safetensors"), change)
    model = adapted(existing, std=0.5) if existing else network()
    before = fingerprint(model)
    with pytest.raises(ValueError, match=message):
        load_adapter(model, path)
    assert_unchanged(before, model)


@pytest.mark.parametrize("existing", [None, "lora"], ids=["fresh model", "adapted model"])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize(
    ("format", "key", "size"),
    [
        ("kohya", "lycoris_4.lora_up.weight", 26),
        ("kohya", "lycoris_0.alpha", 1),
        ("peft", "base_model.model.4.lora_B.weight", 26),
    ],
    ids=["kohya", "kohya alpha", "peft"],
)
def test_a_file_holding_nan_or_inf_is_refused_and_nothing_changes(
    tmp_path, format, key, size, value, existing
) -> None:
    def poison(tensors: dict) -> None:
        tensors[key].view(-1)[-1] = value

    source = save_adapter(adapted("lora"), tmp_path / "a.safetensors", format=format)
    path = rewrite(tmp_path, source, poison)
    model = adapted(existing, std=0.5) if existing else network()
    before = fingerprint(model)
    kind = "NaN" if math.isnan(value) else "inf"
    with pytest.raises(
        ValueError, match=rf"key {re.escape(key)} holds {kind} \(1 of {size} values are not finite"
    ):
        load_adapter(model, path)
    assert_unchanged(before, model)


def test_the_first_non_finite_key_is_named(tmp_path) -> None:
    def poison(tensors: dict) -> None:
        tensors["lycoris_4.lora_down.weight"][0] = math.inf
        tensors["lycoris_2.lora_up.weight"][:] = math.nan

    path = rewrite(tmp_path, save_adapter(adapted("lora"), tmp_path / "a.safetensors"), poison)
    with pytest.raises(ValueError, match=r"key lycoris_2.lora_up.weight holds NaN \(16 of 16"):
        load_adapter(network(), path)


def test_a_peft_config_with_a_non_finite_alpha_is_refused(tmp_path) -> None:
    source = save_adapter(adapted("lora"), tmp_path / "a.safetensors", format="peft")
    path = rewrite(tmp_path, source, lambda t: None)  # drops the metadata: the sidecar counts
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 2, "lora_alpha": math.nan}))
    model = network()
    before = fingerprint(model)
    with pytest.raises(ValueError, match=r"the α of base_model.model.0 is nan; it must be finite"):
        load_adapter(model, path)
    assert_unchanged(before, model)


def test_a_lokr_factor_that_does_not_divide_the_layer_is_refused(tmp_path) -> None:
    source = save_adapter(adapted("lokr", {"full_matrix": True}), tmp_path / "a.safetensors")
    path = rewrite(tmp_path, source, lambda t: t.update({"lycoris_4.lokr_w1": torch.zeros(3, 8)}))
    model = network()
    before = fingerprint(model)
    with pytest.raises(ValueError, match=r"key lycoris_4.lokr_w1: W1 is \(3, 8\), which does not"):
        load_adapter(model, path)
    assert_unchanged(before, model)


def test_two_spellings_of_one_layer_in_one_file_are_refused(tmp_path) -> None:
    pipe = tiny_pipeline()
    inject(pipe.text_encoder, ["encoder.layers.0.self_attn.q_proj"], "lora", rank=2)
    source = save_adapter(pipe, tmp_path / "a.safetensors")
    tensors = load_file(str(source))
    tensors |= {k.replace("te_text_model_", "te_"): v.clone() for k, v in tensors.items()}
    save_file(tensors, str(tmp_path / "b.safetensors"))
    fresh = tiny_pipeline()
    before = fingerprint(fresh.unet, fresh.text_encoder)
    with pytest.raises(ValueError, match=r"both adapt layer encoder.layers.0.self_attn.q_proj"):
        load_adapter(fresh, tmp_path / "b.safetensors")
    assert_unchanged(before, fresh.unet, fresh.text_encoder)


@pytest.mark.parametrize(
    ("method", "options"), [("loha", {}), ("lora", {"rank": 3})], ids=["method", "rank"]
)
def test_an_existing_adapter_of_another_layout_is_not_overwritten(tmp_path, method, options):
    path = save_adapter(adapted("lora"), tmp_path / "a.safetensors")
    model = network()
    inject(model, LAYERS, method, **({"rank": 2} | options))
    before = fingerprint(model)
    with pytest.raises(ValueError, match="already has an adapter 'default' of another layout"):
        load_adapter(model, path)
    assert_unchanged(before, model)


def test_a_peft_key_that_is_not_plain_lora_is_refused(tmp_path) -> None:
    source = save_adapter(adapted("lora"), tmp_path / "a.safetensors", format="peft")
    magnitude = {"base_model.model.4.lora_magnitude_vector": torch.ones(13)}  # DoRA
    path = rewrite(tmp_path, source, lambda t: t.update(magnitude))
    model = network()
    before = fingerprint(model)
    with pytest.raises(ValueError, match="lora_magnitude_vector' is not a peft LoRA tensor"):
        load_adapter(model, path)
    assert_unchanged(before, model)


@pytest.mark.parametrize("method", ["loha", "lokr"])
def test_peft_format_holds_lora_only(tmp_path, method) -> None:
    path = tmp_path / "a.safetensors"
    with pytest.raises(
        ValueError, match=f"format 'peft' holds LoRA only; this adapter is \\['{method}'\\]"
    ):
        save_adapter(adapted(method), path, format="peft")
    assert not path.exists()


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda m, p: save_adapter(m, p, format="ckpt"), "format must be one of"),
        (lambda m, p: save_adapter(m, p.with_suffix(".pt")), "path must end in .safetensors"),
        (lambda m, p: save_adapter(m, p, name="other"), "no adapter called 'other'"),
        (lambda m, p: save_adapter(object(), p), "target must be an nn.Module or a pipeline"),
        (lambda m, p: load_adapter(m, p.with_name("missing.safetensors")), "does not exist"),
        (lambda m, p: load_adapter(m, p.parent), "is not a file"),
    ],
)
def test_bad_arguments(tmp_path, call, message) -> None:
    model = adapted("lora")
    before = fingerprint(model)
    with pytest.raises(ValueError, match=message):
        call(model, tmp_path / "a.safetensors")
    assert_unchanged(before, model)
    assert not (tmp_path / "a.safetensors").exists()


@pytest.mark.parametrize(
    "method, weight, rank, layout",
    [
        ("lora", (13, 200), 4, {}),
        ("lora", (8, 4, 3, 3), 2, {}),
        ("loha", (8, 8, 1, 1), 3, {}),
        ("lokr", (64, 48), 2, {}),  # W1 (8, 6) full, W2 (8, 8) of rank 2
        ("lokr", (64, 48), 1, {"factor": 4, "decompose_both": True}),  # both low rank
        ("lokr", (320, 320), 4, {"decompose_both": True}),  # both low rank
        ("lokr", (320, 320), 10, {"decompose_both": True}),  # r ≥ 20/2: both full
        ("lokr", (64, 48), 2, {"full_matrix": True}),
        ("lokr", (32, 16, 3, 3), 2, {"factor": 2}),
        ("lokr", (32, 16, 3, 3), 8, {}),  # W2 full, with the kernel
    ],
)
def test_a_file_s_layout_is_read_back_through_the_one_table_of_layouts(
    method, weight, rank, layout
) -> None:
    """What lowrank.adapter_shapes lays out (LyCORIS's rules), load_adapter's check reads back
    from the tensors alone, to the same shapes: both come from lowrank.layout_shapes."""
    from lokr_edu.lowrank import adapter_shapes

    kernel = weight[2:] or None
    written = adapter_shapes(method, weight[0], weight[1], rank, kernel_size=kernel, **layout)
    group = {key: torch.zeros(shape) for key, shape in written.items()}
    group["alpha"] = torch.tensor(float(rank))
    read = io._expected_shapes("layer", method, weight, group, io._rank(method, group))
    assert read == {k: v for k, v in written.items() if k != "alpha"}
    assert list(read) == [k for k in written if k != "alpha"]  # the same order of parameters
