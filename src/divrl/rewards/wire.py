"""The wire format of a served reward (``divrl serve-reward``, :class:`~divrl.rewards.RemoteReward`): a
:class:`~divrl.rewards.Group` as one JSON request and a :class:`~divrl.rewards.RewardOutput` as one JSON answer, both
lossless, so a served reward scores exactly what the same reward scores in process.

Request (``POST /predict``)::

    {
      "format": "divrl.group/1",
      "id": "dog", "prompt": "a dog on a beach", "category": "dog", "metadata": {"source": ...},
      "references": [{"kind": "pil", "mode": "RGB"}, ...],     # how to rebuild reference i from tensor "reference.i"
      "masks": [null | {"kind": "pil", "mode": "L"}, ...],    # one entry per reference, tensor "mask.i"
      "tensors": "<base64 safetensors>",                       # "images" (G, 3, H, W) float, "reference.i", "mask.i",
                                                               # and "gen_masks" (G, H, W) when the group has them
      "layouts": {"images": [0, 2, 3, 1]}                      # the memory order of tensors that are not contiguous
    }

Every tensor travels bit for bit (safetensors, base64 in the JSON), in its memory layout: a decoded batch is often
channels-last, and a reward's convolutions and reductions sum in another order on another layout (1-ulp differences
that grow over a run), so a tensor whose memory is a permutation of its dimensions travels in memory order with the
permutation in ``layouts`` and is rebuilt with the same strides. A PIL image travels as its ``uint8`` array and
its mode. A condition's precomputed conditioning, target and rejected images are not sent: rewards score the images
against the references, they do not read those.

Answer: ``{"reward": [...], "components": {"nssm": [...], ...}, "gated": [...]}`` (floats printed by ``repr``, which
round-trips float32 exactly); ``{"non_finite": "<sentence>"}`` when the reward was not finite for the group (the
client raises :class:`~divrl.rewards.NonFiniteReward`: training skips and counts the group, as in process); a
reward's own error comes back as HTTP 422 (the group cannot be scored: the run stops, as in process) or 500.

Plain torch, numpy, PIL and safetensors: the client imports no server code.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from PIL import Image
from safetensors import SafetensorError
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors
from torch import Tensor

from divrl.rewards.base import Group, RewardOutput

__all__ = ["FORMAT", "WireError", "decode_group", "decode_output", "encode_group", "encode_output"]

FORMAT = "divrl.group/1"
"""The request format this version speaks; a server refuses any other."""

FIELDS = ("format", "id", "prompt", "category", "metadata", "references", "masks", "tensors", "layouts")
"""The request's fields, all required (``category`` may be null)."""

_PIL_MODES = ("RGB", "L", "RGBA", "LA", "I", "F")
_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


class WireError(ValueError):
    """A request that does not describe a scoreable group: the sentence names the field and what was expected."""


# ---------------------------------------------------------------------------------------------------- the group


def encode_group(group: Group) -> dict[str, Any]:
    """The JSON request scoring ``group`` (see the module docstring); ``ValueError`` naming the part that cannot
    travel (a reference given as a path, metadata that is not JSON)."""
    sample = group.sample
    tensors = {"images": group.images.detach().cpu()}
    if group.gen_masks is not None:
        tensors["gen_masks"] = torch.as_tensor(group.gen_masks).detach().cpu()
    references = [_pack(image, f"reference.{i}", tensors, sample.id) for i, image in enumerate(sample.references)]
    masks = [
        None if mask is None else _pack(mask, f"mask.{i}", tensors, sample.id) for i, mask in enumerate(sample.masks)
    ]
    try:
        metadata = json.loads(json.dumps(sample.metadata, allow_nan=False))
    except (TypeError, ValueError) as err:
        metadata, problem = None, str(err)
    else:
        problem = "it would arrive changed (tuples as lists, non-string keys as strings)"
    if metadata != sample.metadata:
        raise ValueError(
            f"identity {sample.id!r}: its metadata cannot be sent to a reward server as JSON ({problem}); "
            f"keep the identity's metadata to JSON values"
        )
    if not isinstance(sample.id, str) or not isinstance(sample.prompt, str):
        raise ValueError(f"identity {sample.id!r}: its id and prompt must be strings to be sent to a reward server")
    layouts = {}
    for name, tensor in tensors.items():
        order = _memory_order(tensor)
        if order != list(range(tensor.ndim)):
            layouts[name] = order
            tensors[name] = tensor.permute(order)
    tensors = {name: tensor.contiguous() for name, tensor in tensors.items()}
    return {
        "format": FORMAT,
        "id": sample.id,
        "prompt": sample.prompt,
        "category": sample.category,
        "metadata": metadata,
        "references": references,
        "masks": masks,
        "tensors": base64.b64encode(save_tensors(tensors)).decode("ascii"),
        "layouts": layouts,
    }


def _memory_order(tensor: Tensor) -> list[int]:
    """The dimensions from the slowest to the fastest in memory: ``tensor.permute(order)`` is contiguous when the
    tensor is dense (channels-last ``(B, C, H, W)``: ``[0, 2, 3, 1]``); plain order for anything else."""
    order = sorted(range(tensor.ndim), key=lambda d: (-tensor.stride(d), d))
    dense = tensor.permute(order).is_contiguous()
    return order if dense else list(range(tensor.ndim))


def _pack(image, name: str, tensors: dict[str, Tensor], identity: str) -> dict[str, str]:
    if isinstance(image, Image.Image):
        if image.mode not in _PIL_MODES:
            raise ValueError(
                f"identity {identity!r}: {name} is a PIL image in mode {image.mode!r}, which a reward "
                f"server cannot rebuild; convert it to one of {list(_PIL_MODES)}"
            )
        tensors[name] = torch.from_numpy(np.array(image))
        return {"kind": "pil", "mode": image.mode}
    if isinstance(image, np.ndarray):
        tensors[name] = torch.from_numpy(np.array(image))  # a copy: two entries may share memory, safetensors refuses
        return {"kind": "numpy"}
    if isinstance(image, Tensor):
        tensors[name] = image.detach().cpu().clone(memory_format=torch.preserve_format)
        return {"kind": "tensor"}
    raise ValueError(
        f"identity {identity!r}: {name} is a {type(image).__name__}; a reward server takes PIL images, "
        f"numpy arrays or tensors (open a path first)"
    )


def decode_group(request: Mapping[str, Any]) -> Group:
    """The :class:`~divrl.rewards.Group` a request describes, checked: :class:`WireError` naming the field for a
    request that is not one (unknown or missing fields, another format, bad base64, tensors of the wrong shape or
    dtype, non-finite images, references and masks that do not match)."""
    from divrl.data.stream import ConditionSample

    if not isinstance(request, Mapping):
        raise WireError(f"the request must be a JSON object with the fields {list(FIELDS)}")
    unknown, missing = sorted(set(request) - set(FIELDS)), [f for f in FIELDS if f not in request]
    if unknown or missing:
        raise WireError(
            f"the request has {f'unknown fields {unknown}' if unknown else ''}"
            f"{' and ' if unknown and missing else ''}{f'no {missing}' if missing else ''}; a divrl reward "
            f"request has exactly {list(FIELDS)}"
        )
    if request["format"] != FORMAT:
        raise WireError(
            f"format {request['format']!r} is not {FORMAT!r}: the client and the server run different "
            f"divrl versions; run the same version on both sides"
        )
    for name in ("id", "prompt"):
        if not isinstance(request[name], str):
            raise WireError(f"{name} must be a string, got {type(request[name]).__name__}")
    if request["category"] is not None and not isinstance(request["category"], str):
        raise WireError(f"category must be a string or null, got {type(request['category']).__name__}")
    if not isinstance(request["metadata"], dict):
        raise WireError(f"metadata must be a JSON object, got {type(request['metadata']).__name__}")
    tensors = _laid_out(_tensors(request["tensors"]), request["layouts"])
    images = _images(tensors.pop("images", None))
    gen_masks = tensors.pop("gen_masks", None)
    if gen_masks is not None and (gen_masks.ndim != 3 or gen_masks.shape[0] != images.shape[0]):
        raise WireError(
            f"tensor 'gen_masks' has shape {list(gen_masks.shape)}; expected one mask per image, "
            f"[{images.shape[0]}, H, W]"
        )
    refs, masks = request["references"], request["masks"]
    if not isinstance(refs, list) or not refs or not isinstance(masks, list) or len(masks) != len(refs):
        raise WireError(
            f"references must be a non-empty list and masks a list of the same length (null for a "
            f"reference without a mask), got {_describe(refs)} and {_describe(masks)}"
        )
    references = [_unpack(kind, f"reference.{i}", tensors) for i, kind in enumerate(refs)]
    ref_masks = [None if kind is None else _unpack(kind, f"mask.{i}", tensors) for i, kind in enumerate(masks)]
    if tensors:
        raise WireError(
            f"unknown tensors {sorted(tensors)}; a request carries 'images', 'gen_masks', "
            f"'reference.<i>' and 'mask.<i>' for i < {len(refs)}"
        )
    try:
        sample = ConditionSample(
            request["id"], request["prompt"], references, ref_masks, request["category"], dict(request["metadata"])
        )
    except ValueError as err:
        raise WireError(str(err)) from None
    return Group(sample, images, gen_masks)


def _tensors(text) -> dict[str, Tensor]:
    if not isinstance(text, str):
        raise WireError(f"tensors must be a base64 string of a safetensors file, got {type(text).__name__}")
    try:
        return dict(load_tensors(base64.b64decode(text, validate=True)))
    except (binascii.Error, ValueError) as err:
        raise WireError(f"tensors is not base64 ({err})") from None
    except (SafetensorError, RuntimeError, OverflowError) as err:
        raise WireError(f"tensors is not a safetensors file ({err})") from None


def _laid_out(tensors: dict[str, Tensor], layouts) -> dict[str, Tensor]:
    """The tensors with the memory layouts the client had (``layouts``: name -> the order it was sent in)."""
    if not isinstance(layouts, dict):
        raise WireError(f"layouts must be an object (tensor name -> dimension order), got {type(layouts).__name__}")
    for name, order in layouts.items():
        tensor = tensors.get(name)
        if tensor is None:
            raise WireError(f"layouts names {name!r}, which tensors does not hold")
        if (
            not isinstance(order, list)
            or not all(type(d) is int for d in order)
            or sorted(order) != list(range(tensor.ndim))
        ):
            raise WireError(f"layouts[{name!r}] must be an order of the dimensions 0..{tensor.ndim - 1}, got {order!r}")
        tensors[name] = tensor.permute([order.index(d) for d in range(tensor.ndim)])
    return tensors


def _images(images: Tensor | None) -> Tensor:
    if images is None:
        raise WireError("tensors holds no 'images': the group's generated images, float [G, 3, H, W]")
    if images.ndim != 4 or images.shape[1] != 3 or images.shape[0] < 1 or min(images.shape[2:]) < 1:
        raise WireError(f"tensor 'images' has shape {list(images.shape)}; expected [G, 3, H, W] with G >= 1")
    if images.dtype not in _FLOATS:
        raise WireError(f"tensor 'images' has dtype {images.dtype}; expected a float tensor with values in [0, 1]")
    if not torch.isfinite(images).all():
        bad = sorted(set((~torch.isfinite(images)).flatten(1).any(1).nonzero().flatten().tolist()))
        raise WireError(f"tensor 'images' holds NaN or infinite values (images {bad}); a reward scores finite images")
    return images


def _unpack(kind, name: str, tensors: dict[str, Tensor]):
    if not isinstance(kind, dict) or kind.get("kind") not in ("pil", "numpy", "tensor"):
        raise WireError(
            f"{name}: expected {{'kind': 'pil', 'mode': ...}}, {{'kind': 'numpy'}} or {{'kind': "
            f"'tensor'}}, got {kind!r}"
        )
    value = tensors.pop(name, None)
    if value is None:
        raise WireError(f"tensors holds no {name!r}, which the request lists")
    if kind["kind"] == "tensor":
        return value
    if kind["kind"] == "numpy":
        if value.dtype == torch.bfloat16:
            raise WireError(f"{name}: numpy has no bfloat16; send such an image as a tensor")
        return value.numpy()
    mode = kind.get("mode")
    if mode not in _PIL_MODES or set(kind) != {"kind", "mode"}:
        raise WireError(f"{name}: a PIL image's mode must be one of {list(_PIL_MODES)}, got {kind!r}")
    try:
        image = Image.fromarray(value.numpy())
    except (TypeError, ValueError) as err:
        raise WireError(f"{name}: a {list(value.shape)} {value.dtype} array is no PIL image ({err})") from None
    if image.mode != mode:
        raise WireError(
            f"{name}: a {list(value.shape)} {value.dtype} array is a {image.mode!r} image, the request says {mode!r}"
        )
    return image


def _describe(value) -> str:
    return f"a list of {len(value)}" if isinstance(value, list) else type(value).__name__


# ---------------------------------------------------------------------------------------------------- the answer


def encode_output(out: RewardOutput) -> dict[str, Any]:
    """The JSON answer for a scored group (floats as Python floats: ``repr`` round-trips float32 exactly)."""
    return {
        "reward": out.reward.tolist(),
        "components": {k: v.tolist() for k, v in out.components.items()},
        "gated": out.gated.tolist(),
    }


def decode_output(answer: Any, size: int) -> RewardOutput:
    """The :class:`~divrl.rewards.RewardOutput` of an answer to a group of ``size`` images; :class:`WireError` for an
    answer that is not one (the caller names the server)."""
    if not isinstance(answer, dict) or set(answer) != {"reward", "components", "gated"}:
        keys = sorted(answer) if isinstance(answer, dict) else type(answer).__name__
        raise WireError(f"the answer has {keys}; expected reward, components and gated")

    def floats(name: str, values) -> Tensor:
        if (
            not isinstance(values, list)
            or len(values) != size
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values)
        ):
            raise WireError(f"{name} must be {size} finite numbers, got {str(values)[:200]}")
        return torch.tensor(values, dtype=torch.float32)

    components = answer["components"]
    if not isinstance(components, dict):
        raise WireError(f"components must be an object, got {type(components).__name__}")
    gated = answer["gated"]
    if not isinstance(gated, list) or len(gated) != size or not all(isinstance(g, bool) for g in gated):
        raise WireError(f"gated must be {size} booleans, got {str(gated)[:200]}")
    return RewardOutput(
        floats("reward", answer["reward"]),
        {str(k): floats(f"component {k!r}", v) for k, v in components.items()},
        torch.tensor(gated, dtype=torch.bool),
    )
