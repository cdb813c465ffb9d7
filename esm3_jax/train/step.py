"""One optimizer step, jitted with explicit shardings (the eval step is train/evaluate.py's).

Gradient accumulation is a `lax.scan` over microbatches inside the step: every microbatch's
loss is divided by the *full* batch's per-track counts (known from the masks before the
model runs), so the summed gradient is exactly the full-batch gradient whatever the split.
"""

from __future__ import annotations

from typing import Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from esm3_jax.runtime import cpu_matmul as cpu_matmul_lib
from esm3_jax.train import loss as loss_lib
from esm3_jax.train import optim
from esm3_jax.train import sharding as shd
from esm3_jax.batch import INPUT_KEYS
from esm3_jax.train.state import TrainState


def model_inputs(batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    return {k: batch[k] for k in INPUT_KEYS}


def _split_microbatches(batch: Mapping[str, jax.Array], n: int, mesh: Mesh, rules) -> dict[str, jax.Array]:
    """(B, ...) -> (n, B/n, ...) with microbatch k = rows k, k+n, k+2n, ...

    Reshaping to (B/n, n) keeps every device's contiguous block of rows on that device; the
    microbatch axis is then moved to the front, which is also local. No data moves.
    """

    def split(x):
        y = x.reshape((x.shape[0] // n, n) + x.shape[1:])
        y = jnp.moveaxis(y, 1, 0)
        spec = P(None, *shd.batch_spec(rules, x.ndim))
        return jax.lax.with_sharding_constraint(y, NamedSharding(mesh, spec))

    return {k: split(v) for k, v in batch.items()}


def make_train_step(model: nn.Module, tx: optax.GradientTransformation, *, loss_weights: Mapping[str, float],
                    grad_accum_steps: int, mesh: Mesh, rules,
                    trainable: tuple[str, ...] = ()) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    """The un-jitted train step `(state, batch) -> (state, metrics)`; see `jit_train_step`.

    trainable: the run's train.trainable_patterns. Only the parameters they select are
    differentiated: a frozen kernel then costs no weight-gradient matmul and no full-size
    gradient buffer (its gradient is handed to the optimizer as zeros, which it ignores)."""
    weights = dict(loss_weights)
    is_none = lambda x: x is None

    def loss_fn(train_params, frozen_params, mask, microbatch, counts, rng):
        params = jax.tree.map(lambda m, t, f: t if m else f, mask, train_params, frozen_params, is_leaf=is_none)
        outputs = model.apply({"params": params}, **model_inputs(microbatch), rngs={"dropout": rng})
        sums = loss_lib.track_sums(outputs, microbatch)
        return loss_lib.weighted_loss(sums, counts, weights), sums

    value_and_grad = jax.value_and_grad(loss_fn, has_aux=True)

    def train_step(state: TrainState, batch: dict[str, jax.Array]):
        step_rng, next_rng = jax.random.split(state.rng)
        counts = loss_lib.loss_counts(batch)
        mask = optim.trainable_mask(state.params, trainable)
        train_params = jax.tree.map(lambda p, m: p if m else None, state.params, mask)
        frozen_params = jax.tree.map(lambda p, m: None if m else p, state.params, mask)
        grad_fn = lambda mb, rng: value_and_grad(train_params, frozen_params, mask, mb, counts, rng)
        if grad_accum_steps == 1:
            (_, sums), grads = grad_fn(batch, step_rng)
        else:
            micro = _split_microbatches(batch, grad_accum_steps, mesh, rules)

            def body(carry, mb_and_i):
                mb, i = mb_and_i
                (_, sums), grads = grad_fn(mb, jax.random.fold_in(step_rng, i))
                return jax.tree.map(jnp.add, carry, (grads, sums)), None

            zeros = jax.tree.map(
                jnp.zeros_like,
                jax.eval_shape(lambda: grad_fn(jax.tree.map(lambda x: x[0], micro), step_rng)),
            )
            init = (zeros[1], zeros[0][1])
            (grads, sums), _ = jax.lax.scan(body, init, (micro, jnp.arange(grad_accum_steps)))

        metrics = loss_lib.metrics_from_sums(sums, counts, weights)
        grad_norm = optax.tree.norm(grads)  # of the trainable parameters (the frozen ones' is 0)
        grads = jax.tree.map(lambda m, g, p: g if m else jnp.zeros_like(p), mask, grads, state.params, is_leaf=is_none)
        finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)
        updates, new_opt_state = tx.update(grads, state.opt_state, state.params)
        new_params = optax.apply_updates(state.params, updates)
        # A non-finite step leaves parameters and optimizer moments exactly as they were; the
        # learning-rate schedule still advances, so that the run ends on its schedule.
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
        nonfinite_in_a_row = jnp.where(finite, 0, state.nonfinite_in_a_row + 1)
        new_state = TrainState(
            step=state.step + 1,
            params=keep(new_params, state.params),
            opt_state=_schedule_follows_step(keep(new_opt_state, state.opt_state), new_opt_state),
            rng=next_rng,
            nonfinite_in_a_row=nonfinite_in_a_row,
            nonfinite_total=state.nonfinite_total + jnp.where(finite, 0, 1),
        )
        metrics.update(
            grad_norm=grad_norm,
            param_norm=optax.tree.norm(state.params),
            skipped=(~finite).astype(jnp.int32),
            nonfinite_in_a_row=nonfinite_in_a_row,
            nonfinite_total=new_state.nonfinite_total,
        )
        return new_state, metrics

    return train_step


def _schedule_follows_step(kept, new):
    """`kept` with every learning-rate schedule's counter taken from `new`."""
    is_schedule = lambda x: isinstance(x, optax.ScaleByScheduleState)
    return jax.tree.map(lambda k, n: n if is_schedule(k) else k, kept, new, is_leaf=is_schedule)


def jit_train_step(step_fn, state_shardings, batch_shardings, mesh: Mesh, rules, cpu_matmul: str = cpu_matmul_lib.DEFAULT):
    """jit with explicit in/out shardings and the state donated: the old state's buffers are reused.

    cpu_matmul: the library XLA:CPU runs plain matmuls with (`esm3_jax.runtime.cpu_matmul`).
    """
    jitted = jax.jit(
        step_fn,
        in_shardings=(state_shardings, batch_shardings),
        out_shardings=(state_shardings, NamedSharding(mesh, P())),
        donate_argnums=(0,),
        compiler_options=cpu_matmul_lib.compiler_options(platform_of(mesh), cpu_matmul),
    )
    return InContext(jitted, mesh, rules)


def platform_of(mesh: Mesh) -> str:
    return mesh.devices.flat[0].platform


class InContext:
    """A jitted function that is traced, lowered and run inside the mesh + logical-rules context."""

    def __init__(self, jitted, mesh, rules):
        self._jitted, self._mesh, self._rules = jitted, mesh, rules

    def __call__(self, *args):
        with shd.sharding_context(self._mesh, self._rules):
            return self._jitted(*args)

    def lower(self, *args, platforms: tuple[str, ...] | None = None):
        """Lowered for this machine's backend, or for `platforms` (e.g. ("cuda",) from a CPU)."""
        with shd.sharding_context(self._mesh, self._rules):
            if platforms is None:
                return self._jitted.lower(*args)
            return self._jitted.trace(*args).lower(lowering_platforms=platforms)
