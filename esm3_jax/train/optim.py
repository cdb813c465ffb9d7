"""AdamW with warmup + cosine decay, global-norm clipping and a weight-decay mask (spec 7.4)."""

from __future__ import annotations

import re

import jax
import optax

from esm3_jax.train.config import TrainConfig


def learning_rate_schedule(cfg: TrainConfig) -> optax.Schedule:
    """Linear warmup 0 -> peak over warmup_steps, then cosine decay to min_lr_ratio * peak."""
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=cfg.learning_rate,
        warmup_steps=cfg.warmup_steps,
        decay_steps=cfg.steps,  # optax counts the warmup inside decay_steps
        end_value=cfg.learning_rate * cfg.min_lr_ratio,
    )


def param_path(path: tuple) -> str:
    """'/'-joined names of a pytree path; flax's LogicallyPartitioned box adds a trailing 'value'."""
    names = [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path]
    if names and names[-1] == "value":
        names = names[:-1]
    return "/".join(names)


def weight_decay_mask(params, patterns: tuple[str, ...]):
    """True for the parameters that get weight decay: those whose path matches no pattern."""
    compiled = [re.compile(p) for p in patterns]

    def decays(path, _):
        name = param_path(path)
        return not any(p.search(name) for p in compiled)

    return jax.tree_util.tree_map_with_path(decays, params)


def trainable_mask(params, patterns: tuple[str, ...]):
    """True for the parameters that train: all of them when `patterns` is empty, else those whose
    path matches any pattern (regular expressions, searched)."""
    compiled = [re.compile(p) for p in patterns]
    return jax.tree_util.tree_map_with_path(
        lambda path, _: not compiled or any(p.search(param_path(path)) for p in compiled), params)


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    """The full update rule. Gradient accumulation is done by the train step, not here.

    With train.trainable or train.lora_rank set, the rule runs on the trainable parameters only: optax.multi_transform
    hands them to clip + AdamW (so the clipping norm is theirs alone) and the frozen ones to
    set_to_zero, and builds the inner state on a tree where frozen leaves are empty nodes, so no
    Adam moments are allocated for them; their update is exactly 0, leaving them bit-identical.
    """
    parts = []
    if cfg.grad_clip_norm > 0:
        parts.append(optax.clip_by_global_norm(cfg.grad_clip_norm))
    parts.append(
        optax.adamw(
            learning_rate=learning_rate_schedule(cfg),
            b1=cfg.b1,
            b2=cfg.b2,
            eps=cfg.eps,
            weight_decay=cfg.weight_decay,
            mask=lambda params: weight_decay_mask(params, cfg.no_decay_patterns),
        )
    )
    update = optax.chain(*parts)
    patterns = cfg.trainable_patterns  # train.trainable, plus the LoRA adapters
    if not patterns:
        return update  # the state layout of every run before train.trainable existed
    labels = lambda params: jax.tree.map(lambda t: "trainable" if t else "frozen",
                                         trainable_mask(params, patterns))
    return optax.multi_transform({"trainable": update, "frozen": optax.set_to_zero()}, labels)
