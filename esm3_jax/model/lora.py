"""LoRA adapters in a parameter tree (layers.LoraSpec makes them): split them off, put them back,
and merge them into their kernels, W + (alpha / rank) A @ B, giving the plain model's tree.

Works on nested dicts of arrays (numpy on the host, or jax arrays), scanned stacks included: a
stacked kernel (layers, *in, *out) has stacked adapters (layers, *in, r) and (layers, r, *out).
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from esm3_jax.model.layers import LORA_A, LORA_B


def is_adapter(name: str) -> bool:
    """Whether a parameter name (the last path element) is a LoRA factor."""
    return name.endswith(LORA_A) or name.endswith(LORA_B)


def has_adapters(params: Mapping[str, Any]) -> bool:
    return any(is_adapter(k) or (isinstance(v, Mapping) and has_adapters(v)) for k, v in params.items())


def split_adapters(params: Mapping[str, Any]) -> tuple[dict, dict]:
    """(the tree without adapters, the adapters alone); subtrees left empty are dropped."""
    base, adapters = {}, {}
    for k, v in params.items():
        if isinstance(v, Mapping):
            b, a = split_adapters(v)
            if b:
                base[k] = b
            if a:
                adapters[k] = a
        elif is_adapter(k):
            adapters[k] = v
        else:
            base[k] = v
    return base, adapters


def join_adapters(base: Mapping[str, Any], adapters: Mapping[str, Any]) -> dict:
    """The inverse of split_adapters."""
    out = dict(base)
    for k, v in adapters.items():
        out[k] = join_adapters(out.get(k, {}), v) if isinstance(v, Mapping) else v
    return out


def merge_adapters(params: Mapping[str, Any], alpha: float) -> dict:
    """Host (numpy) params with every adapter folded into its kernel, in float64 then cast back
    to the kernel's dtype; the result has the plain model's tree."""
    out = {}
    for k, v in params.items():
        if isinstance(v, Mapping):
            out[k] = merge_adapters(v, alpha)
        elif not is_adapter(k):
            out[k] = v
    for k, w in list(out.items()):
        if isinstance(w, Mapping) or k + LORA_A not in params:
            continue
        a, b = np.asarray(params[k + LORA_A], np.float64), np.asarray(params[k + LORA_B], np.float64)
        w = np.asarray(w)
        rank = a.shape[-1]
        n_lead = a.ndim + b.ndim - 2 - w.ndim  # 1 for a scanned stack, else 0
        lead = w.shape[:n_lead]
        delta = np.matmul(a.reshape(*lead, -1, rank), b.reshape(*lead, rank, -1)).reshape(w.shape)
        out[k] = (w.astype(np.float64) + (alpha / rank) * delta).astype(w.dtype)
    return out
