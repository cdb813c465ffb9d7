"""Test-side access to the reference implementation; skips cleanly without the `test` extra."""

from __future__ import annotations

import numpy as np
import pytest


def import_reference():
    torch = pytest.importorskip("torch", reason="the reference needs torch (pip install -e '.[test]')")
    pytest.importorskip("esm.models.esm3", reason="reference `esm` package not installed")
    from esm3_jax.compat import reference

    return torch, reference


def build_reference_esm3(d_model: int, n_heads: int, v_heads: int, n_layers: int, seed: int = 0):
    _, reference = import_reference()
    return reference.build_reference_esm3(d_model, n_heads, v_heads, n_layers, seed)


def run_reference(model, inputs: dict) -> dict[str, np.ndarray]:
    _, reference = import_reference()
    return reference.reference_forward(model, inputs)


def relative_error(a: np.ndarray, b: np.ndarray) -> float:
    """max |a - b| / max |b|: one number that is scale free and strict at every element."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / (np.max(np.abs(b)) + 1e-30))
