"""How a PyTorch state dict maps onto a flax parameter tree: a table of (torch key, flax path,
layout) rows read one way on import and the other on export. The ESM3 and structure-tokenizer
tables (esm3_weights.py, tokenizer_weights.py) are written in these terms.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import numpy as np

Array = np.ndarray


@dataclasses.dataclass(frozen=True)
class Layout:
    """How one tensor moves between torch (`to_flax`) and flax (`to_torch`)."""

    to_flax: Callable[[Array], Array]
    to_torch: Callable[[Array], Array]


SAME = Layout(lambda a: a, lambda a: a)
LINEAR = Layout(lambda a: a.T, lambda a: a.T)  # torch (out, in) <-> flax (in, out)


def kernel(in_dim: int, out_shape: tuple[int, ...]) -> Layout:
    """torch (prod(out_shape), in) <-> flax (in, *out_shape)."""
    return Layout(lambda a: a.T.reshape((in_dim, *out_shape)), lambda a: a.reshape(in_dim, -1).T)


def kernel_in(in_shape: tuple[int, ...], out_dim: int) -> Layout:
    """torch (out, prod(in_shape)) <-> flax (*in_shape, out)."""
    return Layout(lambda a: a.T.reshape((*in_shape, out_dim)), lambda a: a.reshape(-1, out_dim).T)


def reshaped(shape: tuple[int, ...]) -> Layout:
    return Layout(lambda a: a.reshape(shape), lambda a: a.reshape(-1))


Row = tuple[str, tuple[str, ...], Layout]


def set_path(tree: dict, path: tuple[str, ...], value: Any) -> None:
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


def get_path(tree: Any, path: tuple[str, ...]) -> Any:
    for k in path:
        tree = tree[k]
    return tree


def state_to_variables(state: dict[str, Array], rows: list[Row], stacked: list[list[Row]], what: str) -> dict:
    """A flax variables tree from a state dict through a row table; strict on both sides."""
    expected = {r[0] for r in rows} | {r[0] for layer in stacked for r in layer}
    missing, unexpected = sorted(expected - state.keys()), sorted(state.keys() - expected)
    if missing or unexpected:
        raise ValueError(f"state dict does not match {what}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    out: dict = {}
    for key, path, layout in rows:
        set_path(out, path, np.asarray(layout.to_flax(np.asarray(state[key], np.float32))))
    for i, (_, path, layout) in enumerate(stacked[0] if stacked else []):
        set_path(out, path, np.stack([layout.to_flax(np.asarray(state[layer[i][0]], np.float32)) for layer in stacked]))
    return out


def variables_to_state(variables: dict, rows: list[Row], stacked: list[list[Row]]) -> dict[str, Array]:
    out = {key: np.ascontiguousarray(layout.to_torch(np.asarray(get_path(variables, path)))) for key, path, layout in rows}
    for j, layer in enumerate(stacked):
        for key, path, layout in layer:
            out[key] = np.ascontiguousarray(layout.to_torch(np.asarray(get_path(variables, path))[j]))
    return out
