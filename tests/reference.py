"""Helpers to build the reference PyTorch implementation (`esm` on PyPI) with random weights.

Its pretrained loaders reach for a model hub; these build the classes directly instead. Tests that
use them skip cleanly when `esm` (the `test` extra) is not installed.
"""

from __future__ import annotations

import types

import numpy as np
import pytest

from esm3_jax import tokens as T


def import_reference():
    torch = pytest.importorskip("torch", reason="the reference needs torch (pip install -e '.[test]')")
    esm3_module = pytest.importorskip("esm.models.esm3", reason="reference `esm` package not installed")
    return torch, esm3_module


def build_reference_esm3(d_model: int, n_heads: int, v_heads: int, n_layers: int, seed: int = 0):
    """A reference ESM3 in fp32 eval mode with random weights, and its state dict as numpy."""
    torch, esm3_module = import_reference()
    torch.manual_seed(seed)
    tokenizers = types.SimpleNamespace(sequence=types.SimpleNamespace(mask_token_id=T.SEQUENCE_MASK))
    model = esm3_module.ESM3(d_model, n_heads, v_heads, n_layers, None, None, None, tokenizers).eval()
    with torch.no_grad():
        # Geometric-attention scales start at zero; random values make every head different.
        for block in model.transformer.blocks:
            if getattr(block, "use_geom_attn", False):
                block.geom_attn.distance_scale_per_head.normal_()
                block.geom_attn.rotation_scale_per_head.normal_()
        # LayerNorm affine parameters start at 1/0; perturb them so a wrong mapping shows.
        for name, p in model.named_parameters():
            if p.ndim == 1 and ("ln" in name or "norm" in name or ".0." in name or ".2." in name):
                p.add_(0.1 * torch.randn_like(p))
    state = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    return model, state


def run_reference(model, inputs: dict) -> dict[str, np.ndarray]:
    torch, _ = import_reference()
    kwargs = {}
    for k, v in inputs.items():
        if v is None:
            continue
        a = np.asarray(v)
        kwargs[k] = torch.from_numpy(a.astype(np.int64) if a.dtype.kind in "iu" else a)
    with torch.no_grad():
        out = model(**kwargs)
    names = ("sequence_logits", "structure_logits", "secondary_structure_logits", "sasa_logits",
             "function_logits", "residue_logits", "embeddings")
    return {n: getattr(out, n).float().numpy() for n in names}


def relative_error(a: np.ndarray, b: np.ndarray) -> float:
    """max |a - b| / max |b|: one number that is scale free and strict at every element."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / (np.max(np.abs(b)) + 1e-30))
