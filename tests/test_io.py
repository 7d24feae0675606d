"""save_adapter / load_adapter: round trips for every method and format, and every refusal."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tiny_sd import outputs, randomize_adapters, tiny_pipeline
from torch import nn

import lokr_edu
import lokr_edu.io as io
from lokr_edu.adapters import adapter_layers, inject
from lokr_edu.io import load_adapter, save_adapter


def network() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(4, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 1),
        nn.Flatten(),
        nn.Linear(200, 13),
    )


X = torch.randn(2, 4, 5, 5, generator=torch.Generator().manual_seed(0))
VARIANTS = [
    ("lora", {}, "kohya"),
    ("lora", {}, "peft"),
    ("loha", {}, "kohya"),
    ("lokr", {}, "kohya"),
    ("lokr", {"decompose_both": True}, "kohya"),
    ("lokr", {"full_matrix": True}, "kohya"),
    ("lokr", {"factor": 2}, "kohya"),
]


def adapted(method: str, options: dict) -> nn.Sequential:
    model = network()
    inject(model, ["0", "2", "4"], method, rank=2, alpha=3.0, **options)
    randomize_adapters(model)
    return model


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize(("method", "options", "format"), VARIANTS)
def test_round_trip_gives_the_same_outputs(tmp_path, method, options, format) -> None:
    model = adapted(method, options)
    path = save_adapter(model, tmp_path / "adapter.safetensors", format=format)
    fresh = network()
    assert load_adapter(fresh, path) == ["0", "2", "4"]
    assert torch.allclose(fresh(X), model(X), atol=1e-6)
    assert all(".adapters." in n for n, p in fresh.named_parameters() if p.requires_grad)


def test_loading_into_a_model_that_has_the_adapter_overwrites_its_values(tmp_path) -> None:
    model = adapted("lokr", {})
    path = save_adapter(model, tmp_path / "a.safetensors")
    other = adapted("lokr", {})
    randomize_adapters(other, std=0.5)
    load_adapter(other, path)
    assert torch.allclose(other(X), model(X), atol=1e-6)
    load_adapter(other, path, name="second")  # a second adapter next to the first
    assert set(other[0].adapters) == {"default", "second"}


def test_file_records_method_rank_alpha_targets_and_base_model(tmp_path) -> None:
    path = save_adapter(adapted("loha", {}), tmp_path / "a.safetensors", dtype=torch.float16)
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
        assert f.get_tensor("lycoris_0.hada_w1_a").dtype == torch.float16
        assert sorted(f.keys()) == sorted(
            f"lycoris_{i}.{t}"
            for i in (0, 2, 4)
            for t in ["hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"]
        )
    assert metadata["lokr_edu.method"] == "loha"
    assert metadata["lokr_edu.rank"] == "[2]" and metadata["lokr_edu.alpha"] == "[3.0]"
    assert metadata["lokr_edu.targets"] == '["0", "2", "4"]'
    assert metadata["lokr_edu.base_model"] == "Sequential"


def test_pipeline_keys_follow_kohya(tmp_path) -> None:
    pipe = tiny_pipeline()
    inject(pipe.unet, ["to_q"], "lora", rank=2)
    inject(pipe.text_encoder, ["q_proj"], "lora", rank=2)
    path = save_adapter(pipe, tmp_path / "a.safetensors")
    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
    assert (
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight"
        in keys
    )
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha" in keys


def test_a_crash_while_writing_leaves_the_old_file_intact(tmp_path, monkeypatch) -> None:
    path = save_adapter(adapted("lora", {}), tmp_path / "a.safetensors")
    before = path.read_bytes()

    def crash(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(io, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        save_adapter(adapted("loha", {}), path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["a.safetensors"]  # no temporary left behind


@pytest.mark.parametrize("suffix", [".pt", ".bin", ".ckpt", ".pth"])
def test_pickle_files_are_refused_unread(tmp_path, suffix) -> None:
    path = tmp_path / f"adapter{suffix}"
    path.write_bytes(b"\x80\x04 not even opened")
    model = network()
    with pytest.raises(ValueError, match="is a pickle file .* can run any code"):
        load_adapter(model, path)
    assert not list(adapter_layers(model))


def test_a_file_that_is_not_safetensors_is_refused(tmp_path) -> None:
    path = tmp_path / "adapter.safetensors"
    path.write_bytes(b"\x80\x04\x95 a pickle in disguise")
    with pytest.raises(ValueError, match="is not a safetensors file"):
        load_adapter(network(), path)


def test_unknown_key_is_refused_and_nothing_changes(tmp_path) -> None:
    tensors = {
        k: v
        for k, v in io.load_file(
            str(save_adapter(adapted("lora", {}), tmp_path / "a.safetensors"))
        ).items()
    }
    tensors["lycoris_9.lora_down.weight"] = torch.zeros(2, 8)
    save_file(tensors, str(tmp_path / "b.safetensors"))
    model = network()
    before = snapshot(model)
    with pytest.raises(ValueError, match="key 'lycoris_9.lora_down.weight' names no nn.Linear"):
        load_adapter(model, tmp_path / "b.safetensors")
    assert not list(adapter_layers(model))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_wrong_shape_is_refused_with_both_shapes_and_nothing_changes(tmp_path) -> None:
    tensors = io.load_file(str(save_adapter(adapted("lora", {}), tmp_path / "a.safetensors")))
    tensors["lycoris_4.lora_down.weight"] = torch.zeros(2, 199)
    save_file(tensors, str(tmp_path / "b.safetensors"))
    model = network()
    before = snapshot(model)
    message = (
        r"key lycoris_4.lora_down.weight has shape \(2, 199\), "
        r"but layer 4 with weight \(13, 200\) needs \(2, 200\)"
    )
    with pytest.raises(ValueError, match=message):
        load_adapter(model, tmp_path / "b.safetensors")
    assert not list(adapter_layers(model))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_an_existing_adapter_of_another_layout_is_not_overwritten(tmp_path) -> None:
    path = save_adapter(adapted("lora", {}), tmp_path / "a.safetensors")
    model = adapted("loha", {})
    before = snapshot(model)
    with pytest.raises(ValueError, match="already has an adapter 'default' of another layout"):
        load_adapter(model, path)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda m, p: save_adapter(m, p, format="ckpt"), "format must be one of"),
        (lambda m, p: save_adapter(m, p.with_suffix(".pt")), "path must end in .safetensors"),
        (lambda m, p: save_adapter(m, p, name="other"), "no adapter called 'other'"),
        (lambda m, p: save_adapter(object(), p), "target must be an nn.Module or a pipeline"),
        (lambda m, p: load_adapter(m, p.with_name("missing.safetensors")), "does not exist"),
    ],
)
def test_bad_arguments(tmp_path, call, message) -> None:
    model = adapted("lora", {})
    with pytest.raises(ValueError, match=message):
        call(model, tmp_path / "a.safetensors")


def test_peft_format_holds_lora_only(tmp_path) -> None:
    with pytest.raises(ValueError, match="format 'peft' holds LoRA only"):
        save_adapter(adapted("lokr", {}), tmp_path / "a.safetensors", format="peft")


@pytest.mark.parametrize("format", ["kohya", "peft"])
def test_pipeline_round_trip(tmp_path, format) -> None:
    pipe = tiny_pipeline()
    inject(pipe.unet, ["to_q", "to_k", "to_v", "to_out.0"], "lora", rank=4, alpha=2.0)
    inject(pipe.text_encoder, ["q_proj", "v_proj"], "lora", rank=2)
    randomize_adapters(pipe.unet, pipe.text_encoder)
    path = lokr_edu.save_adapter(pipe, tmp_path / "a.safetensors", format=format)
    fresh = tiny_pipeline()
    base = outputs(fresh)
    lokr_edu.load_adapter(fresh, path)
    for ours, theirs, untouched in zip(outputs(fresh), outputs(pipe), base, strict=True):
        assert torch.allclose(ours, theirs, atol=1e-5)
        assert not torch.allclose(ours, untouched, atol=1e-3)
