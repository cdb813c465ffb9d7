"""The one setup chain of a training run: model -> optimizer -> mesh and shardings -> jitted steps.

The train loop, `aot` and `bench train-step` all build their step here, so the step that is
compiled for a TPU topology or timed on a CPU is the very step a run trains with.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding

from esm3_jax.model import lora
from esm3_jax.model.esm3 import ESM3
from esm3_jax.train import evaluate, finetune, optim
from esm3_jax.train import sharding as shd
from esm3_jax.train import state as state_lib
from esm3_jax.train import step as step_lib
from esm3_jax.train.config import Config


@dataclasses.dataclass(frozen=True)
class TrainSetup:
    """A run's model, optimizer and mesh, and its state's abstract shapes and shardings."""

    cfg: Config
    mesh: Mesh
    rules: Any  # flax logical-axis rules
    model: nn.Module
    tx: optax.GradientTransformation
    abstract_state: state_lib.TrainState  # shapes and dtypes only
    state_shardings: state_lib.TrainState  # a NamedSharding per leaf

    @property
    def param_count(self) -> int:
        return state_lib.param_count(self.abstract_state.params)

    @property
    def trainable_count(self) -> int:
        """Parameters the optimizer updates (all of them unless train.trainable or LoRA is set)."""
        mask = optim.trainable_mask(self.abstract_state.params, self.cfg.train.trainable_patterns)
        return int(sum(np.prod(p.shape) for p, t in zip(jax.tree.leaves(self.abstract_state.params),
                                                        jax.tree.leaves(mask)) if t))

    def fresh_state(self) -> state_lib.TrainState:
        """A new state from `train.seed`, each array created directly in its sharded layout."""
        return state_lib.create_state(self.model, self.tx, self.cfg.train.seed, self.state_shardings)

    def initial_state(self) -> state_lib.TrainState:
        """The state a run without checkpoints of its own starts from: `train.init_from`'s
        parameters with a fresh optimizer state at step 0, or else a fresh state."""
        tc = self.cfg.train
        if not tc.init_from:
            return self.fresh_state()
        target = state_lib.abstract_with_shardings(self.abstract_state.params, self.state_shardings.params)
        if not tc.lora_rank:
            params = finetune.load_initial_params(tc.init_from, self.cfg.model, target)
            return state_lib.state_from_params(params, self.tx, tc.seed, self.state_shardings)
        # LoRA: the checkpoint holds the base weights; the adapters are new, from train.seed.
        base_target, adapter_target = lora.split_adapters(target)
        base = finetune.load_initial_params(tc.init_from, self.cfg.model, base_target)
        adapters = state_lib.create_params(self.model, tc.seed, jax.tree.map(lambda t: t.sharding, adapter_target),
                                           select=lambda p: lora.split_adapters(p)[1])
        return state_lib.state_from_params(lora.join_adapters(base, adapters), self.tx, tc.seed, self.state_shardings)

    def restore_target(self) -> dict[str, Any]:
        """What a checkpoint restore is asked for: the state's shapes with their shardings."""
        return state_lib.abstract_with_shardings(self.abstract_state.as_dict(), self.state_shardings.as_dict())

    def abstract_state_with_shardings(self) -> state_lib.TrainState:
        return state_lib.abstract_with_shardings(self.abstract_state, self.state_shardings)

    def batch_shardings(self, batch_like: Mapping[str, Any]) -> dict[str, NamedSharding]:
        return shd.batch_shardings(batch_like, self.mesh, self.rules)

    def train_step(self, batch_shardings: Mapping[str, NamedSharding]) -> step_lib.InContext:
        """The jitted `(state, batch) -> (state, metrics)`, state donated."""
        tc = self.cfg.train
        step_fn = step_lib.make_train_step(self.model, self.tx, loss_weights=tc.loss_weights.as_dict(),
                                           grad_accum_steps=tc.grad_accum_steps, mesh=self.mesh, rules=self.rules,
                                           trainable=tc.trainable_patterns)
        return step_lib.jit_train_step(step_fn, self.state_shardings, batch_shardings, self.mesh, self.rules,
                                       cpu_matmul=tc.cpu_matmul)

    def eval_step(self, batch_shardings: Mapping[str, NamedSharding]) -> step_lib.InContext:
        """The jitted `(params, batch) -> (per-track sums, counts)` (train/evaluate.py)."""
        return evaluate.make_eval_step(self.model, self.state_shardings.params, batch_shardings, self.mesh,
                                       self.rules, cpu_matmul=self.cfg.train.cpu_matmul)


def setup_training(cfg: Config, devices: list) -> TrainSetup:
    """Build the chain for `cfg` on `devices` (shapes only: no parameter is allocated here)."""
    mesh = shd.make_mesh(cfg.mesh, devices)
    rules = cfg.mesh.rules.as_flax_rules()
    model = ESM3(cfg.model, lora=cfg.train.lora_spec())
    tx = optim.make_optimizer(cfg.train)
    abstract, shardings = state_lib.state_shardings(model, tx, mesh, rules)
    # A pattern that selects nothing is a typo that would silently freeze the whole model: fail
    # here, before anything is compiled (aot and bench check it too).
    finetune.validate_trainable(cfg.train.trainable_patterns, [optim.param_path(p) for p, _ in
                                                      jax.tree_util.tree_leaves_with_path(abstract.params)])
    return TrainSetup(cfg=cfg, mesh=mesh, rules=rules, model=model, tx=tx, abstract_state=abstract,
                      state_shardings=shardings)
