"""The train state and its creation, sharded from the first byte.

The state is created by a jitted init whose out_shardings come from the parameters' logical
axis names, so no process ever holds an unsharded copy of a large model.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from esm3_jax.batch import example_inputs
from esm3_jax.train import sharding as shd


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: train steps taken, skipped (non-finite) ones included
    params: Any
    opt_state: Any
    rng: jax.Array  # uint32[2]: split once per step for any stochastic layer
    nonfinite_in_a_row: jax.Array  # int32: consecutive steps skipped for a non-finite loss/grad
    nonfinite_total: jax.Array  # int32: all steps skipped so far

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainState":
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls)})


def _init_boxed(model: nn.Module, tx: optax.GradientTransformation, rng: jax.Array) -> TrainState:
    """The state with parameters (and their Adam moments) still boxed with logical axis names."""
    init_rng, state_rng = jax.random.split(rng)
    # The parameters do not depend on the attention kernel, and the dummy 8-token row is too short
    # for the splash kernel's blocks: create them through the plain XLA attention.
    if getattr(getattr(model, "config", None), "attention", "xla") != "xla":
        model = model.clone(config=dataclasses.replace(model.config, attention="xla"))
    params = model.init(init_rng, **example_inputs(1, 8))["params"]
    zero = jnp.zeros((), jnp.int32)
    return TrainState(step=zero, params=params, opt_state=tx.init(params), rng=state_rng,
                      nonfinite_in_a_row=zero, nonfinite_total=zero)


def state_shardings(model: nn.Module, tx: optax.GradientTransformation, mesh: Mesh, rules):
    """(abstract unboxed state, its NamedShardings). Costs no FLOPs: shapes only."""
    abstract_boxed = jax.eval_shape(lambda r: _init_boxed(model, tx, r), jax.random.PRNGKey(0))
    logical = nn.get_partition_spec(abstract_boxed)
    abstract = nn.unbox(abstract_boxed)
    return abstract, shd.logical_to_shardings(logical, abstract, mesh, rules)


def create_state(model: nn.Module, tx: optax.GradientTransformation, seed: int, shardings) -> TrainState:
    """A fresh state, each array created directly in its sharded layout."""
    init = jax.jit(lambda r: nn.unbox(_init_boxed(model, tx, r)), out_shardings=shardings)
    return init(jax.random.PRNGKey(seed))


def create_params(model: nn.Module, seed: int, shardings, select=lambda params: params):
    """`select` of a fresh model's parameters (the same init as `create_state` from `seed`), each
    array created in its sharded layout; parameters `select` drops are never computed."""

    if getattr(getattr(model, "config", None), "attention", "xla") != "xla":  # as _init_boxed
        model = model.clone(config=dataclasses.replace(model.config, attention="xla"))

    def init(r):
        init_rng, _ = jax.random.split(r)
        return select(nn.unbox(model.init(init_rng, **example_inputs(1, 8))["params"]))

    return jax.jit(init, out_shardings=shardings)(jax.random.PRNGKey(seed))


def state_from_params(params, tx: optax.GradientTransformation, seed: int, shardings) -> TrainState:
    """A step-0 state around existing (sharded) parameters: a fresh optimizer state, and the same
    step RNG a fresh state from `seed` gets. The moments are created in their sharded layout."""

    def build(p):
        _, state_rng = jax.random.split(jax.random.PRNGKey(seed))
        zero = jnp.zeros((), jnp.int32)
        return TrainState(step=zero, params=p, opt_state=tx.init(p), rng=state_rng,
                          nonfinite_in_a_row=zero, nonfinite_total=zero)

    return jax.jit(build, in_shardings=(shardings.params,), out_shardings=shardings)(params)


def abstract_with_shardings(abstract, shardings):
    """ShapeDtypeStructs carrying target shardings: what a checkpoint restore is asked for."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def param_count(params) -> int:
    return int(sum(np.prod(p.shape) for p in jax.tree.leaves(params)))
