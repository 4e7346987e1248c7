"""pytorch-fid's InceptionV3 weights -> a safetensors file for `unclip_jax.models.inception`.

    inception.convert("pt_inception-2015-12-05-6726825d.pth", "fid_inception.safetensors")

pytorch-fid distributes the FID network's weights (ported from TensorFlow's
`inception-2015-12-05`) as a PyTorch pickle. It is read here ONCE, with
`torch.load(weights_only=True)` (tensors only, no arbitrary objects), checked name by name and
shape by shape against the linen module, and written as safetensors; everything at run time
(`unclip_jax.evaluation.features`) reads the safetensors file only. Nothing is downloaded: give a
local copy of the weights file.

Names (see `unclip_jax.models.inception`): `<block>.<conv>.conv.weight` [O, I, kh, kw] becomes
`<block>/<conv>/conv/kernel` [kh, kw, I, O]; `<block>.<conv>.bn.{weight, bias, running_mean,
running_var}` becomes `<block>/<conv>/bn/{scale, bias, mean, var}`. The 1008-way classifier
(`fc.*`), an auxiliary classifier (`AuxLogits.*`) and BatchNorm's `num_batches_tracked` are not
part of the feature network and are dropped.
"""
from __future__ import annotations

import os
from typing import Any, Mapping

import numpy as np

from unclip_jax.convert import ConversionError

BN_NAMES = {"weight": "scale", "bias": "bias", "running_mean": "mean", "running_var": "var"}
DROPPED_PREFIXES = ("fc.", "AuxLogits.")
DROPPED_SUFFIXES = (".num_batches_tracked",)


def convert_state_dict(state_dict: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """A pytorch-fid `InceptionV3` / `fid_inception_v3()` state dict (torch tensors or numpy) ->
    {flat linen name: float32 numpy}. Raises ConversionError listing every missing, unexpected or
    misshapen weight."""
    problems, out = [], {}
    for name, value in state_dict.items():
        if name.startswith("blocks."):
            # pytorch-fid's `InceptionV3` wrapper (blocks.<i>.<j>...) instead of the bare network.
            problems.append(f"{name}: this is the state dict of pytorch-fid's InceptionV3 wrapper; "
                            "give the weights of fid_inception_v3() (pt_inception-2015-12-05-*.pth)")
            break
        if name.startswith(DROPPED_PREFIXES) or name.endswith(DROPPED_SUFFIXES):
            continue
        parts = name.split(".")
        array = np.asarray(value.detach().cpu().numpy() if hasattr(value, "detach") else value)
        if parts[-2:] == ["conv", "weight"] and array.ndim == 4:
            # Contiguous: safetensors writes an array's memory as it lies, strides ignored.
            out["/".join(parts[:-1] + ["kernel"])] = np.ascontiguousarray(
                array.transpose(2, 3, 1, 0), np.float32)
        elif parts[-2] == "bn" and parts[-1] in BN_NAMES:
            out["/".join(parts[:-1] + [BN_NAMES[parts[-1]]])] = np.ascontiguousarray(array, np.float32)
        else:
            problems.append(f"{name}: not a weight of the FID InceptionV3 (shape {list(array.shape)})")
    from unclip_jax.models import inception

    expected = inception.param_shapes()
    for name, shape in expected.items():
        if name not in out:
            problems.append(f"missing weight for {name} (shape {list(shape)})")
        elif tuple(out[name].shape) != shape:
            problems.append(f"{name}: shape {list(out[name].shape)}, the network needs {list(shape)}")
    problems += [f"{name}: not a weight of the FID InceptionV3" for name in out if name not in expected]
    if problems:
        raise ConversionError("these InceptionV3 weights", problems)
    return out


def read_torch_weights(path: str) -> Mapping[str, Any]:
    """The state dict in a PyTorch weights file, loaded with weights_only=True (tensors only)."""
    import torch

    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} does not exist: give a local copy of pytorch-fid's weights "
                                "file (pt_inception-2015-12-05-6726825d.pth)")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, Mapping) and "state_dict" in state and isinstance(state["state_dict"], Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping):
        raise ConversionError(path, [f"expected a state dict (name -> tensor), got {type(state).__name__}"])
    return state


def convert(torch_path: str, out_path: str) -> dict[str, np.ndarray]:
    """Converts pytorch-fid's weights file `torch_path` into the safetensors file `out_path`
    (written to a temporary name, then renamed; an existing file is never overwritten)."""
    from safetensors.numpy import save_file

    if os.path.exists(out_path):
        raise FileExistsError(f"{out_path} already exists: pick another name (a conversion never "
                              "overwrites anything)")
    params = convert_state_dict(read_torch_weights(torch_path))
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    tmp = f"{out_path}.tmp-{os.getpid()}"
    try:
        save_file(params, tmp, metadata={"format": "unclip_jax.models.inception",
                                         "converted_from": os.path.basename(torch_path)})
        os.replace(tmp, out_path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return params
