"""Saving and loading adapters as safetensors, in the formats other tools read.

Defined in chapter 04 (notebooks/04_adapter_from_scratch.ipynb); used in chapter 07.

A file stores the factors of every adapted layer, never ΔW itself; whoever loads it rebuilds
ΔW = (α/r)·up @ down (LoRA), (α/r)·(w1a @ w1b) ⊙ (w2a @ w2b) (LoHa) or scale·W1 ⊗ W2 (LoKr)
from them (`lokr_edu.lowrank`). Two formats, each a flat {key: tensor} safetensors file:

- "kohya": what A1111, ComfyUI, kohya sd-scripts and lycoris-lora read. One group of keys per
  adapted layer, `<layer key>.<tensor>`:
      layer key  lora_unet_<path> (U-Net), lora_te_<path> (text encoder), lycoris_<path> (any
                 other model: lycoris-lora's prefix for a generic module), "." -> "_" in <path>.
                 Text-encoder paths are written as SD1.5 files spell them, with `text_model.`
                 (transformers 4); loading accepts them with or without it (transformers 5).
      tensors    LoRA  lora_down.weight (r, n[, kh, kw]), lora_up.weight (m, r[, 1, 1]), alpha
                 LoHa  hada_w1_a (m, r), hada_w1_b (r, n·kh·kw), hada_w2_a, hada_w2_b, alpha
                 LoKr  lokr_w1 (a, b) | lokr_w1_a (a, r) + lokr_w1_b (r, b),
                       lokr_w2 (c, d[, kh, kw]) | lokr_w2_a (c, r) + lokr_w2_b (r, d·kh·kw), alpha
      alpha is a 0-d tensor; a stored alpha of 0 (or none) means α = r. When both LoKr factors
      are full there is no rank, and the scale is 1 whatever alpha says (LyCORIS's rule).
- "peft": what diffusers' `pipe.load_lora_weights` and peft read; LoRA only.
      <component>.<path>.lora_A.weight (= lora_down), <component>.<path>.lora_B.weight (= lora_up)
      for a pipeline (component "unet" / "text_encoder"); base_model.model.<path>.lora_A.weight
      for a plain module (peft's own spelling). r and α are not in the tensors: diffusers keeps
      LoraConfig's arguments in the metadata entry "lora_adapter_metadata", JSON with keys
      "<component>.r", "<component>.lora_alpha", "<component>.alpha_pattern", ... (unprefixed
      for a plain module). Files written by peft's `save_pretrained` keep them in the
      adapter_config.json beside the file instead; without either, α = r (diffusers' rule).

Both formats record "lokr_edu.method", "lokr_edu.rank", "lokr_edu.alpha", "lokr_edu.targets" and
"lokr_edu.base_model" in the safetensors metadata (strings; rank, alpha and targets as JSON).

`target` is an nn.Module or a diffusers pipeline (its `unet` and `text_encoder`). Files are
written atomically. Pickle files (.pt, .bin, .ckpt, ...) are refused: unpickling runs code.
A file that does not fit the model, or holds NaN or inf, is refused before anything in the
model changes.
"""

from __future__ import annotations

import json
import math
import os
import re
import secrets
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from lokr_edu.adapters import (
    WRAPPABLE,
    Adapter,
    AdapterLayer,
    adapter_layers,
    make_adapter,
    tensor_key,
)
from lokr_edu.lowrank import layout_shapes
from lokr_edu.sd15 import COMPONENTS, kohya_key

__all__ = [
    "FORMATS",
    "GENERIC_PREFIX",
    "load_adapter",
    "read_safetensors",
    "save_adapter",
    "write_safetensors_atomically",
]

FORMATS = ("kohya", "peft")
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl", ".pickle")
METADATA_KEY = "lora_adapter_metadata"  # diffusers' name for the LoraConfig it stores
PEFT_CONFIG_FILE = "adapter_config.json"  # where peft's save_pretrained puts r and lora_alpha
PEFT_MODEL_PREFIX = "base_model.model."  # peft's prefix for the keys of a plain module
GENERIC_PREFIX = "lycoris"  # lycoris-lora's LycorisNetwork.LORA_PREFIX for a generic module

# The tensors of one layer that lokr_edu reads, per method; anything else in a group is refused.
METHOD_TENSORS = {
    "lora": ("lora_down.weight", "lora_up.weight"),
    "loha": ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"),
    "lokr": ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b"),
}
# Tensors that other LyCORIS variants store, and what they are, for the refusal message.
UNSUPPORTED_TENSORS = {
    "lora_mid.weight": "a Tucker (use_tucker) LoCon core",
    "hada_t1": "a Tucker (use_tucker) LoHa core",
    "hada_t2": "a Tucker (use_tucker) LoHa core",
    "lokr_t2": "a Tucker (use_tucker) LoKr core",
    "dora_scale": "DoRA's weight decomposition (dora_wd)",
    "scalar": "a trained output scalar (use_scalar)",
    "diff": "a full ΔW (algo 'full')",
    "diff_b": "a full bias update (algo 'full')",
}


# ---------------------------------------------------------------------------------------------
# what a target is made of
# ---------------------------------------------------------------------------------------------


class Layer(NamedTuple):
    """One nn.Linear / nn.Conv2d (or AdapterLayer around one) that a file can adapt."""

    component: str | None  # "unet" / "text_encoder" for SD parts, None for a plain module
    name: str  # dotted module name inside its component
    module: nn.Module


def _components(target: object) -> list[tuple[str | None, nn.Module]]:
    """(component, module) pairs: a pipeline's U-Net and text encoder, or the module itself.

    component is "unet" / "text_encoder" for SD parts (also when given alone), else None.
    """
    if isinstance(target, nn.Module):
        kind = type(target).__name__
        if kind == "UNet2DConditionModel":
            return [("unet", target)]
        if kind == "CLIPTextModel":
            return [("text_encoder", target)]
        return [(None, target)]
    parts = [(c, getattr(target, c, None)) for c in COMPONENTS]
    parts = [(c, m) for c, m in parts if isinstance(m, nn.Module)]
    if not parts:
        raise ValueError(
            f"target must be an nn.Module or a pipeline with a unet / text_encoder, "
            f"got {type(target).__name__}"
        )
    return parts


def _adaptable(target: object) -> Iterator[Layer]:
    """Every Linear / Conv2d of the target that is not inside an AdapterLayer, and every
    AdapterLayer, in module order."""
    for component, model in _components(target):
        wrapped: list[str] = []  # names of AdapterLayers: their `base` is not listed again
        for name, module in model.named_modules():
            if any(name.startswith(w + ".") for w in wrapped):
                continue
            if isinstance(module, AdapterLayer):
                wrapped.append(name)
            if isinstance(module, (*WRAPPABLE, AdapterLayer)):
                yield Layer(component, name, module)


def _kohya_prefix(layer: Layer, prefix: str, text_model: bool = True) -> str:
    """The kohya layer key: lora_unet_..., lora_te_text_model_... (or lora_te_... when
    text_model is False: the module's own transformers-5 path), or <prefix>_... ."""
    if layer.component is None:
        return f"{prefix}_{layer.name}".replace(".", "_")
    if layer.component == "text_encoder" and not text_model:
        return f"lora_te_{layer.name}".replace(".", "_")
    return kohya_key(layer.name, layer.component)


def _peft_path(layer: Layer) -> str:
    """The peft / diffusers key of a layer, without ".lora_A.weight"."""
    if layer.component is None:
        return PEFT_MODEL_PREFIX + layer.name
    return f"{layer.component}.{layer.name}"


def _layer_index(target: object, format: str, prefix: str) -> dict[str, Layer]:
    """File layer key -> layer, for every spelling a loader accepts: text-encoder layers with
    and without `text_model.`, plain-module peft keys with and without `base_model.model.`,
    and the bare module path when the target is a U-Net or text encoder on its own."""
    index: dict[str, Layer] = {}
    alone = isinstance(target, nn.Module)
    for layer in _adaptable(target):
        if format == "kohya":
            index[_kohya_prefix(layer, prefix, text_model=True)] = layer
            index[_kohya_prefix(layer, prefix, text_model=False)] = layer
            continue
        path = _peft_path(layer)
        index[path] = layer
        if alone:
            index[layer.name] = layer
        if layer.component == "text_encoder" and not layer.name.startswith("text_model."):
            index[f"text_encoder.text_model.{layer.name}"] = layer
    return index


def _label(layer: Layer, target: object) -> str:
    """How results and metadata name a layer: its module path, after "unet." or
    "text_encoder." when the target is a pipeline."""
    if layer.component is None or isinstance(target, nn.Module):
        return layer.name
    return f"{layer.component}.{layer.name}"


# ---------------------------------------------------------------------------------------------
# files
# ---------------------------------------------------------------------------------------------


def _pickle_refusal(path: Path, why: str) -> ValueError:
    return ValueError(
        f"{path.name} is {why}: loading a pickle can run any code it contains, so lokr_edu never "
        "opens one. Ask for a .safetensors version, or convert it yourself with a tool you trust."
    )


def read_safetensors(path: Path | str) -> tuple[dict[str, Tensor], dict[str, str]]:
    """(tensors, metadata) of a .safetensors file. Pickle files are refused unread: by their
    suffix (.pt, .pth, .bin, .ckpt, .pkl, .pickle) or, whatever the name, when safetensors
    cannot parse the header and the first bytes are a pickle's (0x80) or a zip archive's
    ("PK\\x03\\x04", what torch.save writes around a pickle); any other file safetensors
    cannot parse is refused too. safetensors itself only parses a JSON header and copies
    bytes: nothing in the file is ever run. Defined in chapter 04."""
    path = Path(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise _pickle_refusal(path, f"a pickle file ({path.suffix})")
    if not path.exists():
        raise ValueError(f"path: {path} does not exist")
    if not path.is_file():
        raise ValueError(f"path: {path} is not a file")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except (SafetensorError, OSError) as error:
        with open(path, "rb") as f:
            head = f.read(4)
        if head.startswith(b"\x80"):
            raise _pickle_refusal(path, "a pickle (its first byte is 0x80)") from None
        if head == b"PK\x03\x04":
            raise _pickle_refusal(path, "a zip archive, as torch.save writes a pickle") from None
        raise ValueError(f"{path.name} is not a safetensors file ({error}); refusing it") from error
    return load_file(str(path)), metadata


def write_safetensors_atomically(
    tensors: dict[str, Tensor], path: Path, metadata: dict[str, str]
) -> None:
    """Write to a temporary file beside `path`, flush it to disk, then rename it over `path`:
    a crash at any point leaves either the old file or the new one, never half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        save_file(tensors, str(temporary), metadata=metadata)
        with open(temporary, "rb") as f:
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    if hasattr(os, "O_DIRECTORY"):  # POSIX: make the rename itself durable
        directory = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)


# ---------------------------------------------------------------------------------------------
# saving
# ---------------------------------------------------------------------------------------------


def save_adapter(
    target: object,
    path: Path | str,
    format: str = "kohya",
    name: str = "default",
    *,
    prefix: str = GENERIC_PREFIX,
    dtype: torch.dtype | None = None,
    base_model: str | None = None,
    text_model_keys: bool = True,
) -> Path:
    """Save the adapter called `name` of every wrapped layer of `target` to a .safetensors file.

    format "kohya" (LoRA, LoHa, LoKr) or "peft" (LoRA only); the module docstring gives both
    layouts. prefix names the layers of a plain module in the kohya format ("lycoris", as
    lycoris-lora does). dtype converts the tensors (e.g. torch.float16, as most shared files
    are); base_model is recorded in the metadata (default: the class names of the target's
    parts). text_model_keys: kohya text-encoder keys as SD1.5 files spell them
    (`lora_te_text_model_...`, what A1111 and ComfyUI read); False writes the module's own
    transformers-5 path, which is what lycoris-lora 4 matches on a transformers-5 CLIPTextModel.
    The strength η is a setting of the loaded model, not of the file, and is not saved.
    Returns the path. Defined in chapter 04.
    """
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"path must end in .safetensors, got {path.name}")
    adapters = [
        (layer, layer.module.adapters[name])
        for layer in _adaptable(target)
        if isinstance(layer.module, AdapterLayer) and name in layer.module.adapters
    ]
    if not adapters:
        raise ValueError(f"name: target has no adapter called {name!r}")
    methods = sorted({a.method for _, a in adapters})
    if format == "peft" and methods != ["lora"]:
        raise ValueError(
            f"format 'peft' holds LoRA only; this adapter is {methods}: use format='kohya' "
            "(diffusers cannot load LoHa / LoKr files for SD1.5; lokr_edu.load_adapter can)"
        )

    def cast(t: Tensor) -> Tensor:
        t = t.detach().to("cpu").contiguous()
        return t.to(dtype) if dtype is not None else t

    tensors: dict[str, Tensor] = {}
    for layer, adapter in adapters:
        if format == "kohya":  # by hand: diffusers.utils.convert_state_dict_to_kohya is LoRA only
            key = _kohya_prefix(layer, prefix, text_model_keys)
            for parameter, value in adapter.named_parameters():
                tensors[f"{key}.{tensor_key(parameter)}"] = cast(value)
            tensors[f"{key}.alpha"] = cast(adapter.alpha)
        else:
            key = _peft_path(layer)
            tensors[f"{key}.lora_A.weight"] = cast(adapter.lora_down)
            tensors[f"{key}.lora_B.weight"] = cast(adapter.lora_up)

    ranks = Counter(a.rank for _, a in adapters)
    alphas = Counter(a.alpha.item() for _, a in adapters)
    targets = [_label(layer, target) for layer, _ in adapters]
    metadata = {
        "lokr_edu.format": format,
        "lokr_edu.method": ",".join(methods),
        "lokr_edu.rank": json.dumps(sorted(ranks)),
        "lokr_edu.alpha": json.dumps(sorted(alphas)),
        "lokr_edu.targets": json.dumps(targets),
        "lokr_edu.base_model": base_model
        or ",".join(type(m).__name__ for _, m in _components(target)),
    }
    if format == "peft":
        metadata["format"] = "pt"  # what diffusers and transformers write
        metadata[METADATA_KEY] = json.dumps(_lora_config(adapters), indent=2, sort_keys=True)
    write_safetensors_atomically(tensors, path, metadata)
    return path


def _lora_config(adapters: list[tuple[Layer, Adapter]]) -> dict[str, object]:
    """diffusers' metadata: LoraConfig arguments per component, keys "<component>.<argument>".

    r and lora_alpha are the most common rank and α; layers that differ are listed by name in
    rank_pattern / alpha_pattern (peft matches a pattern against the end of a module name).
    """
    config: dict[str, object] = {}
    for component in dict.fromkeys(layer.component for layer, _ in adapters):
        own = [(layer.name, a) for layer, a in adapters if layer.component == component]
        rank = Counter(a.rank for _, a in own).most_common(1)[0][0]
        alpha = Counter(a.alpha.item() for _, a in own).most_common(1)[0][0]
        arguments = {
            "r": rank,
            "lora_alpha": alpha,
            "target_modules": [n for n, _ in own],
            "rank_pattern": {n: a.rank for n, a in own if a.rank != rank},
            "alpha_pattern": {n: a.alpha.item() for n, a in own if a.alpha.item() != alpha},
        }
        prefix = "" if component is None else f"{component}."
        config.update({f"{prefix}{k}": v for k, v in arguments.items()})
    return config


def _require_finite(tensors: dict[str, Tensor], path: Path) -> None:
    """Refuse a file with NaN or inf in any tensor, naming the first such key (in key order).

    Such a file loads without complaint otherwise, and every output of the model is then NaN:
    black or noise images, with nothing saying why. It comes from a diverged training run or a
    broken export.
    """
    for key in sorted(tensors):
        value = tensors[key]
        if not value.is_floating_point() or torch.isfinite(value).all():
            continue
        kind = "NaN" if torch.isnan(value).any() else "inf"
        bad = int((~torch.isfinite(value)).sum())
        raise ValueError(
            f"key {key} holds {kind} ({bad} of {value.numel()} values are not finite): "
            f"{path.name} would make every output of the model NaN; refusing it. It comes from "
            "a training run that diverged or an export that went wrong: export the adapter "
            "again from the last checkpoint whose loss was finite."
        )


# ---------------------------------------------------------------------------------------------
# reading a file's groups: {layer key: {tensor name: tensor}}, with alpha filled in
# ---------------------------------------------------------------------------------------------


def _kohya_groups(tensors: dict[str, Tensor]) -> dict[str, dict[str, Tensor]]:
    groups: dict[str, dict[str, Tensor]] = {}
    for key, value in tensors.items():
        layer_key, _, tensor_name = key.partition(".")
        groups.setdefault(layer_key, {})[tensor_name] = value
    return groups


def _peft_config(path: Path, metadata: dict[str, str]) -> dict[str, object]:
    """LoraConfig arguments: diffusers' metadata entry, else peft's adapter_config.json beside
    the file, else none (α = r)."""
    if METADATA_KEY in metadata:
        return json.loads(metadata[METADATA_KEY])
    sidecar = path.with_name(PEFT_CONFIG_FILE)
    if sidecar.is_file():
        return json.loads(sidecar.read_text())
    return {}


def _peft_alpha(config: dict[str, object], path: str, rank: int) -> float:
    """α of the layer at `path` (a peft key without .lora_A.weight), read as peft reads it:
    the first alpha_pattern entry that matches the end of the module name, else lora_alpha,
    else r."""
    component, _, module = path.partition(".")
    prefix = f"{component}." if any(k.startswith(f"{component}.") for k in config) else ""
    module = module if prefix else path.removeprefix(PEFT_MODEL_PREFIX)
    if config.get(f"{prefix}use_rslora") or config.get(f"{prefix}use_dora"):
        raise ValueError(
            "peft config: use_rslora / use_dora adapters are not plain LoRA; lokr_edu cannot "
            "load them"
        )
    alpha = config.get(f"{prefix}lora_alpha")
    for pattern, value in dict(config.get(f"{prefix}alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            alpha = value
            break
    alpha = float(rank if alpha is None else alpha)
    if not math.isfinite(alpha):  # JSON as Python writes it can hold NaN and Infinity
        raise ValueError(f"peft config: the α of {path} is {alpha}; it must be finite")
    return alpha


def _peft_groups(
    tensors: dict[str, Tensor], config: dict[str, object]
) -> dict[str, dict[str, Tensor]]:
    """peft / diffusers keys -> kohya-style groups, keyed by the peft path of the layer."""
    names = {"lora_A.weight": "lora_down.weight", "lora_B.weight": "lora_up.weight"}
    groups: dict[str, dict[str, Tensor]] = {}
    for key, value in tensors.items():
        path, _, tensor_name = key.rpartition(".lora_")
        if f"lora_{tensor_name}" not in names:
            raise ValueError(
                f"key {key!r} is not a peft LoRA tensor (lora_A.weight / lora_B.weight); "
                "lokr_edu reads plain LoRA only in the peft format"
            )
        groups.setdefault(path, {})[names[f"lora_{tensor_name}"]] = value
    for path, group in groups.items():
        if "lora_down.weight" in group:
            rank = group["lora_down.weight"].shape[0]
            group["alpha"] = torch.tensor(_peft_alpha(config, path, rank))
    return groups


# ---------------------------------------------------------------------------------------------
# checking a group against a layer
# ---------------------------------------------------------------------------------------------


def _method(layer_key: str, group: dict[str, Tensor]) -> str:
    """LoRA, LoHa or LoKr, from the tensor names; anything lokr_edu cannot rebuild is refused."""
    for tensor_name in group:
        if tensor_name in UNSUPPORTED_TENSORS:
            raise ValueError(
                f"key {layer_key}.{tensor_name} is {UNSUPPORTED_TENSORS[tensor_name]}, which "
                "lokr_edu does not implement; refusing the file"
            )
    found = [m for m, names in METHOD_TENSORS.items() if any(n in group for n in names)]
    if len(found) != 1:
        kind = "tensors of several methods" if found else "no LoRA / LoHa / LoKr tensor"
        raise ValueError(f"key {layer_key}.*: layer {layer_key} has {kind}: {sorted(group)}")
    for tensor_name in group:
        if tensor_name not in (*METHOD_TENSORS[found[0]], "alpha"):
            raise ValueError(f"key {layer_key}.{tensor_name} is not a {found[0]} tensor")
    return found[0]


# (tensor, axis that holds r), in the order r is read
RANK_AXES = {
    "lora": [("lora_down.weight", 0), ("lora_up.weight", 1)],
    "loha": [("hada_w1_b", 0), ("hada_w1_a", 1), ("hada_w2_b", 0), ("hada_w2_a", 1)],
    "lokr": [("lokr_w1_a", 1), ("lokr_w1_b", 0), ("lokr_w2_a", 1), ("lokr_w2_b", 0)],
}


def _rank(method: str, group: dict[str, Tensor]) -> int:
    """r read off the shapes: the rank axis of the first low-rank factor present."""
    for key, axis in RANK_AXES[method]:
        if key in group and group[key].dim() > axis:
            return group[key].shape[axis]
    alpha = group.get("alpha")  # LoKr with both factors full: no rank; LyCORIS stores α = r
    return max(1, int(alpha.item())) if alpha is not None and alpha.numel() == 1 else 1


def _expected_shapes(
    layer_key: str,
    method: str,
    weight_shape: tuple[int, ...],
    group: dict[str, Tensor],
    rank: int,
) -> dict[str, tuple[int, ...]]:
    """The shape each stored tensor must have to adapt a layer whose weight is `weight_shape`,
    in the layout the file chose (for LoKr: W1's shape (a, b) and which factors are full), from
    `lowrank.layout_shapes`, the one table of layouts."""
    if method != "lokr":
        return layout_shapes(method, weight_shape, rank)
    m, n = weight_shape[0], weight_shape[1]
    w1_key = "lokr_w1" if "lokr_w1" in group else "lokr_w1_a"
    if "lokr_w1" in group and group["lokr_w1"].dim() == 2:
        a, b = group["lokr_w1"].shape
    elif "lokr_w1" in group:  # the shape check reports it
        a, b = m, n
    else:
        w1a, w1b = group.get("lokr_w1_a"), group.get("lokr_w1_b")
        a = w1a.shape[0] if w1a is not None and w1a.dim() == 2 else m
        b = w1b.shape[1] if w1b is not None and w1b.dim() == 2 else n
    if m % a or n % b:  # W1 ⊗ W2 is (a·c, b·d): a must divide m and b divide n
        raise ValueError(
            f"key {layer_key}.{w1_key}: W1 is ({a}, {b}), which does not divide layer weight "
            f"{weight_shape}: a = {a} must divide m = {m} and b = {b} must divide n = {n}"
        )
    return layout_shapes(
        "lokr",
        weight_shape,
        rank,
        w1=(a, b),
        w1_low_rank="lokr_w1" not in group,
        w2_low_rank="lokr_w2" not in group,
    )


def _plan(
    layer_key: str, group: dict[str, Tensor], layer: Layer, name: str
) -> tuple[Layer, Adapter]:
    """A new Adapter holding the group's values, after checking every key and shape against
    the layer (and against an adapter `name` it already has). Touches nothing in the model."""
    module = layer.module
    base = module.base if isinstance(module, AdapterLayer) else module
    weight_shape = tuple(base.weight.shape)
    method = _method(layer_key, group)
    rank = _rank(method, group)
    expected = _expected_shapes(layer_key, method, weight_shape, group, rank)
    for key, shape in expected.items():
        if key not in group:
            raise ValueError(
                f"key {layer_key}.{key} is missing: layer {layer.name} needs it with shape {shape}"
            )
    for key, shape in expected.items():
        got = tuple(group[key].shape)
        if got != shape:
            raise ValueError(
                f"key {layer_key}.{key} has shape {got}, but layer {layer.name} with weight "
                f"{weight_shape} needs {shape}"
            )
    if "alpha" in group and group["alpha"].numel() != 1:
        raise ValueError(
            f"key {layer_key}.alpha has shape {tuple(group['alpha'].shape)}, but alpha is one "
            "number: it needs ()"
        )
    alpha = float(group["alpha"].item()) if "alpha" in group else None
    adapter = make_adapter(method, base, rank, alpha or None, shapes=expected)  # 0 or None: α = r
    with torch.no_grad():
        for parameter, value in adapter.named_parameters():
            value.copy_(group[tensor_key(parameter)].to(value.dtype))
    if isinstance(module, AdapterLayer) and name in module.adapters:
        existing = module.adapters[name]
        has = {n: tuple(p.shape) for n, p in existing.named_parameters()}
        wants = {n: tuple(p.shape) for n, p in adapter.named_parameters()}
        if existing.method != method or has != wants:
            raise ValueError(
                f"name: layer {layer.name} already has an adapter {name!r} of another layout "
                f"({existing.method}, {existing.keys}); load under another name"
            )
    return layer, adapter


# ---------------------------------------------------------------------------------------------
# loading
# ---------------------------------------------------------------------------------------------


def load_adapter(
    target: object, path: Path | str, name: str = "default", *, prefix: str = GENERIC_PREFIX
) -> list[str]:
    """Load a kohya/LyCORIS or peft/diffusers .safetensors adapter into `target` as `name`.

    The format is told by the keys (".lora_A." / ".lora_B." is peft). A layer without adapters
    is wrapped in an AdapterLayer with an adapter of the file's kind: lora_down -> LoRA, hada_
    -> LoHa, lokr_ -> LoKr, with r, α and the layout (which LoKr factors are full, the factor
    split (a, b)) read off the shapes; a stored alpha of 0 means α = r. A layer that already
    has an adapter called `name` of the same layout gets the file's values (a merged one is
    unmerged, refilled and merged again). prefix: the kohya prefix of a plain module's layers.

    Every key and shape is checked before the model changes: a pickle, a file that is not
    safetensors, a key that names no layer, a tensor of the wrong shape (the error gives the
    first offending key and both shapes), a tensor lokr_edu does not implement (Tucker, DoRA),
    a tensor holding NaN or inf (the error names the first such key) or an adapter `name` of
    another layout raises ValueError and leaves the model as it was.
    As after `inject`, only adapter parameters are trainable afterwards.
    Returns the names of the adapted modules ("unet.<path>" / "text_encoder.<path>" for a
    pipeline). Defined in chapter 04.
    """
    path = Path(path)
    tensors, metadata = read_safetensors(path)
    _require_finite(tensors, path)
    is_peft = any(".lora_A." in k or ".lora_B." in k for k in tensors)
    if is_peft:
        groups = _peft_groups(tensors, _peft_config(path, metadata))
        index = _layer_index(target, "peft", prefix)
    else:
        groups = _kohya_groups(tensors)
        index = _layer_index(target, "kohya", prefix)

    if not groups:
        raise ValueError(f"{path.name} holds no tensors: there is no adapter to load")
    planned: list[tuple[Layer, Adapter]] = []
    claimed: dict[int, str] = {}  # id(module) -> the layer key that adapts it
    for layer_key, group in groups.items():
        if layer_key not in index:
            first_key = f"{layer_key}.{next(iter(group))}"
            raise ValueError(f"key {first_key!r} names no nn.Linear / nn.Conv2d of the target")
        layer = index[layer_key]
        if id(layer.module) in claimed:
            raise ValueError(
                f"keys {claimed[id(layer.module)]}.* and {layer_key}.* both adapt layer "
                f"{layer.name}; a file holds one adapter per layer"
            )
        claimed[id(layer.module)] = layer_key
        planned.append(_plan(layer_key, group, layer, name))

    # everything fits: now change the model
    models = dict(_components(target))
    for layer, adapter in planned:
        module = layer.module
        if isinstance(module, AdapterLayer) and name in module.adapters:
            was_merged = name in module.merged
            module.unmerge(name)
            module.adapters[name].load_state_dict(adapter.state_dict())
            if was_merged:
                module.merge(name)
            continue
        if not isinstance(module, AdapterLayer):
            wrapper = AdapterLayer(module)
            parent, _, child = layer.name.rpartition(".")
            setattr(models[layer.component].get_submodule(parent), child, wrapper)
            module = wrapper
        module.add(name, adapter)
    for model in models.values():
        for p in model.parameters():
            p.requires_grad_(False)
        for _, wrapper in adapter_layers(model):
            wrapper.adapters.requires_grad_(True)
    return [_label(layer, target) for layer, _ in planned]
