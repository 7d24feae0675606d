"""Saving and loading adapters as safetensors, in the formats other tools read.

Defined in chapter 04 (notebooks/04_adapter_from_scratch.ipynb).

Two formats, one flat {key: tensor} file each:

- "kohya" (what A1111, ComfyUI, kohya sd-scripts and lycoris-lora read), one group of keys per
  adapted layer, `<layer key>.<tensor>`:
      layer key  lora_unet_<path> (U-Net), lora_te_<path> (text encoder, transformers-4 path with
                 `text_model.`), lycoris_<path> (any other model); "." in the path becomes "_"
      tensors    LoRA  lora_down.weight, lora_up.weight, alpha
                 LoHa  hada_w1_a, hada_w1_b, hada_w2_a, hada_w2_b, alpha
                 LoKr  lokr_w1 | lokr_w1_a + lokr_w1_b, lokr_w2 | lokr_w2_a + lokr_w2_b, alpha
- "peft" (what diffusers' `pipe.load_lora_weights` reads; LoRA only):
      <component>.<path>.lora_A.weight (= down), <component>.<path>.lora_B.weight (= up), with
      r and lora_alpha in the metadata entry "lora_adapter_metadata" (JSON), as diffusers writes.

`target` is an nn.Module or a diffusers pipeline (its `unet` and `text_encoder`). Files are
written atomically. Pickle files (.pt, .bin, .ckpt, ...) are refused: unpickling runs code.
A file that does not fit the model is refused before anything in the model changes.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections import Counter
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from lokr_edu.adapters import WRAPPABLE, Adapter, AdapterLayer, adapter_layers
from lokr_edu.sd15 import kohya_key

__all__ = ["FORMATS", "save_adapter", "load_adapter", "read_safetensors"]

FORMATS = ("kohya", "peft")
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl", ".pickle")
METADATA_KEY = "lora_adapter_metadata"  # diffusers' name for the LoraConfig it stores
GENERIC_PREFIX = "lycoris"  # the prefix lycoris-lora gives layers of a model that is not SD


# ---------------------------------------------------------------------------------------------
# what a target is made of
# ---------------------------------------------------------------------------------------------


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
    parts = [(c, getattr(target, c, None)) for c in ("unet", "text_encoder")]
    parts = [(c, m) for c, m in parts if isinstance(m, nn.Module)]
    if not parts:
        raise ValueError(
            f"target must be an nn.Module or a pipeline with a unet / text_encoder, "
            f"got {type(target).__name__}"
        )
    return parts


def _layer_key(component: str | None, name: str, prefix: str, text_model: bool = True) -> str:
    if component is None:
        return f"{prefix}_{name}".replace(".", "_")
    if component == "text_encoder" and not text_model:
        return f"lora_te_{name}".replace(".", "_")  # the module's own path, as LyCORIS 4 writes
    return kohya_key(name, component)


def _layers(target: object, prefix: str) -> dict[str, tuple[str | None, str, nn.Module]]:
    """kohya layer key -> (component, module name, module) for every layer that can be adapted.

    Text-encoder layers are listed under both spellings: with `text_model_` (SD1.5 files) and
    without it (what lycoris-lora writes for a transformers-5 CLIPTextModel).
    """
    found: dict[str, tuple[str | None, str, nn.Module]] = {}
    for component, model in _components(target):
        for name, module in model.named_modules():
            if name.endswith(".base") and isinstance(model.get_submodule(name[:-5]), AdapterLayer):
                continue
            if isinstance(module, (*WRAPPABLE, AdapterLayer)):
                found[_layer_key(component, name, prefix)] = (component, name, module)
                if component == "text_encoder":
                    found[f"lora_te_{name}".replace(".", "_")] = (component, name, module)
    return found


# ---------------------------------------------------------------------------------------------
# files
# ---------------------------------------------------------------------------------------------


def read_safetensors(path: Path | str) -> tuple[dict[str, Tensor], dict[str, str]]:
    """(tensors, metadata) of a .safetensors file; pickle files are refused, unread."""
    path = Path(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise ValueError(
            f"{path.name} is a pickle file ({path.suffix}): loading a pickle can run any code "
            "it contains, so lokr_edu never opens one. Ask for a .safetensors version, or "
            "convert it yourself with a tool you trust."
        )
    if not path.exists():
        raise ValueError(f"path: {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except (SafetensorError, OSError) as error:
        raise ValueError(f"{path.name} is not a safetensors file ({error}); refusing it") from error
    return load_file(str(path)), metadata


def _write_atomically(tensors: dict[str, Tensor], path: Path, metadata: dict[str, str]) -> None:
    """Write to a temporary file beside `path`, flush it to disk, then rename it over `path`:
    a crash at any point leaves either the old file or the new one, never half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    try:
        save_file(tensors, temporary, metadata=metadata)
        with open(temporary, "rb") as f:
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


# ---------------------------------------------------------------------------------------------
# saving
# ---------------------------------------------------------------------------------------------


def _file_name(parameter: str) -> str:
    return f"{parameter}.weight" if parameter in ("lora_down", "lora_up") else parameter


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

    format "kohya" (LoRA, LoHa, LoKr) or "peft" (LoRA only). dtype converts the tensors (e.g.
    torch.float16, as most shared files are); base_model is recorded in the metadata.
    text_model_keys: text-encoder keys as SD1.5 files spell them (`lora_te_text_model_...`, what
    A1111 and ComfyUI read); False writes the module's own transformers-5 path, which is what
    lycoris-lora 4 matches when it loads a file into a transformers-5 CLIPTextModel.
    """
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"path must end in .safetensors, got {path.name}")
    adapters = [
        (component, module_name, layer.adapters[name])
        for component, model in _components(target)
        for module_name, layer in adapter_layers(model)
        if name in layer.adapters
    ]
    if not adapters:
        raise ValueError(f"name: target has no adapter called {name!r}")
    methods = sorted({a.method for _, _, a in adapters})
    if format == "peft" and methods != ["lora"]:
        raise ValueError(
            f"format 'peft' holds LoRA only; this adapter is {methods}: use format='kohya'"
        )

    def cast(t: Tensor) -> Tensor:
        t = t.detach().to("cpu").contiguous()
        return t.to(dtype) if dtype is not None else t

    tensors: dict[str, Tensor] = {}
    for component, module_name, adapter in adapters:
        if format == "kohya":
            key = _layer_key(component, module_name, prefix, text_model_keys)
            for parameter, value in adapter.named_parameters():
                tensors[f"{key}.{_file_name(parameter)}"] = cast(value)
            tensors[f"{key}.alpha"] = cast(adapter.alpha)
        else:
            key = module_name if component is None else f"{component}.{module_name}"
            tensors[f"{key}.lora_A.weight"] = cast(adapter.lora_down)
            tensors[f"{key}.lora_B.weight"] = cast(adapter.lora_up)

    ranks = Counter(a.rank for _, _, a in adapters)
    alphas = Counter(a.alpha.item() for _, _, a in adapters)
    metadata = {
        "lokr_edu.format": format,
        "lokr_edu.method": ",".join(methods),
        "lokr_edu.rank": json.dumps(sorted(ranks)),
        "lokr_edu.alpha": json.dumps(sorted(alphas)),
        "lokr_edu.targets": json.dumps([m for _, m, _ in adapters]),
        "lokr_edu.base_model": base_model
        or ",".join(type(m).__name__ for _, m in _components(target)),
    }
    if format == "peft":
        metadata[METADATA_KEY] = json.dumps(_lora_config(adapters), sort_keys=True)
    _write_atomically(tensors, path, metadata)
    return path


def _lora_config(adapters: list[tuple[str | None, str, Adapter]]) -> dict[str, object]:
    """diffusers' metadata: LoraConfig arguments per component, keys "<component>.<argument>"."""
    config: dict[str, object] = {}
    for component in dict.fromkeys(c for c, _, _ in adapters):
        own = [(m, a) for c, m, a in adapters if c == component]
        rank = Counter(a.rank for _, a in own).most_common(1)[0][0]
        alpha = Counter(a.alpha.item() for _, a in own).most_common(1)[0][0]
        arguments = {
            "r": rank,
            "lora_alpha": alpha,
            "target_modules": [m for m, _ in own],
            "rank_pattern": {m: a.rank for m, a in own if a.rank != rank},
            "alpha_pattern": {m: a.alpha.item() for m, a in own if a.alpha.item() != alpha},
        }
        prefix = "" if component is None else f"{component}."
        config.update({f"{prefix}{k}": v for k, v in arguments.items()})
    return config


# ---------------------------------------------------------------------------------------------
# loading
# ---------------------------------------------------------------------------------------------


def _method(tensors: dict[str, Tensor]) -> str:
    if "lora_down.weight" in tensors:
        return "lora"
    if any(k.startswith("hada_") for k in tensors):
        return "loha"
    if any(k.startswith("lokr_") for k in tensors):
        return "lokr"
    raise ValueError(f"tensors {sorted(tensors)} are none of LoRA, LoHa, LoKr")


def _rank(method: str, tensors: dict[str, Tensor]) -> int:
    if method == "lora":
        return tensors["lora_down.weight"].shape[0]
    if method == "loha":
        return tensors["hada_w1_b"].shape[0]
    for key in ("lokr_w1_a", "lokr_w2_a"):
        if key in tensors:
            return tensors[key].shape[1]
    alpha = tensors.get("alpha")
    return max(1, int(alpha.item())) if alpha is not None else 1  # both full: r is not used


def _expected_shapes(
    method: str, weight_shape: tuple[int, ...], tensors: dict[str, Tensor], rank: int
) -> dict[str, tuple[int, ...]]:
    """The shape each stored tensor must have to adapt a layer whose weight is `weight_shape`."""
    m, n, kernel = weight_shape[0], weight_shape[1], tuple(weight_shape[2:])
    kk = 1
    for k in kernel:
        kk *= k
    if method == "lora":
        return {
            "lora_down.weight": (rank, n, *kernel),
            "lora_up.weight": (m, rank, *(1,) * len(kernel)),
        }
    if method == "loha":
        return {
            "hada_w1_a": (m, rank),
            "hada_w1_b": (rank, n * kk),
            "hada_w2_a": (m, rank),
            "hada_w2_b": (rank, n * kk),
        }
    w1 = tensors.get("lokr_w1")
    a = w1.shape[0] if w1 is not None else tensors["lokr_w1_a"].shape[0]
    b = w1.shape[1] if w1 is not None else tensors["lokr_w1_b"].shape[1]
    c, d = (m // a if m % a == 0 else -1), (n // b if n % b == 0 else -1)
    shapes: dict[str, tuple[int, ...]] = (
        {"lokr_w1": (a, b)} if w1 is not None else {"lokr_w1_a": (a, rank), "lokr_w1_b": (rank, b)}
    )
    if "lokr_w2" in tensors:
        shapes["lokr_w2"] = (c, d, *kernel)
    else:
        shapes |= {"lokr_w2_a": (c, rank), "lokr_w2_b": (rank, d * kk)}
    return shapes


def _kohya_groups(tensors: dict[str, Tensor]) -> dict[str, dict[str, Tensor]]:
    groups: dict[str, dict[str, Tensor]] = {}
    for key, value in tensors.items():
        layer_key, _, tensor_name = key.partition(".")
        groups.setdefault(layer_key, {})[tensor_name] = value
    return groups


def _peft_groups(
    tensors: dict[str, Tensor], metadata: dict[str, str]
) -> dict[str, dict[str, Tensor]]:
    """peft / diffusers keys -> the kohya-style groups load_adapter works with (keyed by the
    module path, with the component as its first part)."""
    config = json.loads(metadata.get(METADATA_KEY, "{}"))
    groups: dict[str, dict[str, Tensor]] = {}
    for key, value in tensors.items():
        path, _, tensor_name = key.removeprefix("base_model.model.").rpartition(".lora_")
        names = {"A.weight": "lora_down.weight", "B.weight": "lora_up.weight"}
        if tensor_name not in names:
            raise ValueError(f"key {key!r} is not a peft LoRA tensor (lora_A / lora_B)")
        groups.setdefault(path, {})[names[tensor_name]] = value
    for path, group in groups.items():
        component, _, module = path.partition(".")
        prefix = f"{component}." if component in ("unet", "text_encoder") else ""
        module = module if prefix else path
        alpha = config.get(f"{prefix}alpha_pattern", {}).get(
            module, config.get(f"{prefix}lora_alpha")
        )
        group["alpha"] = torch.tensor(float(alpha or group["lora_down.weight"].shape[0]))
    return groups


def _peft_layers(target: object) -> dict[str, tuple[str | None, str, nn.Module]]:
    found = {}
    for component, name, module in _layers(target, GENERIC_PREFIX).values():
        found[name if component is None else f"{component}.{name}"] = (component, name, module)
    return found


def load_adapter(
    target: object, path: Path | str, name: str = "default", *, prefix: str = GENERIC_PREFIX
) -> list[str]:
    """Load a kohya/LyCORIS or peft/diffusers .safetensors adapter into `target` as `name`.

    Layers without adapters are wrapped (method, rank, α and layout read off the tensors);
    a layer that already has an adapter called `name` of the same layout gets the file's values.
    Every key and shape is checked before the model changes; returns the adapted module names.
    """
    tensors, metadata = read_safetensors(path)
    is_peft = any(".lora_A." in k or ".lora_B." in k for k in tensors)
    groups = _peft_groups(tensors, metadata) if is_peft else _kohya_groups(tensors)
    layers = _peft_layers(target) if is_peft else _layers(target, prefix)

    planned: list[tuple[nn.Module, str, str | None, Adapter]] = []
    for layer_key, group in groups.items():
        first_key = f"{layer_key}.{next(iter(group))}"
        if layer_key not in layers:
            raise ValueError(f"key {first_key!r} names no nn.Linear / nn.Conv2d of the target")
        component, module_name, module = layers[layer_key]
        base = module.base if isinstance(module, AdapterLayer) else module
        method = _method(group)
        rank = _rank(method, group)
        expected = _expected_shapes(method, tuple(base.weight.shape), group, rank)
        for key, shape in expected.items():
            got = tuple(group[key].shape) if key in group else None
            if got != shape:
                raise ValueError(
                    f"key {layer_key}.{key} has shape {got}, but layer {module_name} with weight "
                    f"{tuple(base.weight.shape)} needs {shape}"
                )
        alpha = float(group["alpha"].item()) if "alpha" in group else None
        adapter = Adapter(method, base, rank, alpha or None, shapes=expected)
        existing = (
            module.adapters[name]
            if isinstance(module, AdapterLayer) and name in module.adapters
            else None
        )
        if existing is not None and existing.keys != adapter.keys:
            raise ValueError(
                f"name: layer {module_name} already has an adapter {name!r} of another layout "
                f"({existing.method}, {existing.keys}); load under another name"
            )
        with torch.no_grad():
            for parameter, value in adapter.named_parameters():
                value.copy_(group[_file_name(parameter)].to(value.dtype))
        planned.append((module, module_name, component, adapter))

    # everything fits: now change the model
    models = dict(_components(target))
    for module, module_name, component, adapter in planned:
        if isinstance(module, AdapterLayer) and name in module.adapters:
            with torch.no_grad():
                for (_, old), (_, new) in zip(
                    module.adapters[name].named_parameters(),
                    adapter.named_parameters(),
                    strict=True,
                ):
                    old.copy_(new)
                module.adapters[name].alpha.copy_(adapter.alpha)
            continue
        if not isinstance(module, AdapterLayer):
            model = models[component]
            layer = AdapterLayer(module)
            parent, _, child = module_name.rpartition(".")
            setattr(model.get_submodule(parent), child, layer)
            module = layer
        module.add(name, adapter)
    for _, model in _components(target):
        for p in model.parameters():
            p.requires_grad_(False)
        for _, layer in adapter_layers(model):
            layer.adapters.requires_grad_(True)
    return [module_name for _, module_name, _, _ in planned]
