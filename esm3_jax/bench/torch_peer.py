"""The PyTorch alternative to esm3-jax's train step: the reference `esm` ESM3 with the same weights,
the same batch and the same objective (a torch port of train/loss.py), trained with the same
update rule (global-norm clipping, AdamW with the config's betas, eps, weight decay and its
no-decay mask, the learning rate from the config's schedule).

This is what a user would write instead of esm3-jax, and what `esm3-jax bench train-step
--against-torch` times side by side with the JAX step, in eager mode and under torch.compile.
"""

from __future__ import annotations

import time
from typing import Mapping

import numpy as np

from esm3_jax import tokens as T
from esm3_jax.batch import INPUT_KEYS, TRACKS
from esm3_jax.train.loss import CATEGORICAL_TRACKS, RESIDUE_KEYS


def torch_batch(host: Mapping[str, np.ndarray]) -> dict:
    """numpy batch -> torch tensors (integers as int64, the index dtype torch's gather wants)."""
    import torch

    return {k: torch.from_numpy(np.ascontiguousarray(v.astype(np.int64) if v.dtype.kind in "iu" else v))
            for k, v in host.items()}


def torch_loss_counts(batch: Mapping) -> dict:
    """train/loss.py's loss_counts: the number of loss terms per track."""
    counts = {}
    for track in TRACKS:
        mask = batch[f"{track}_loss_mask"]
        if track == "function":
            mask = mask[..., None] & (batch["function_target"] != T.FUNCTION_PAD)
        counts[track] = mask.sum().float()
    return counts


def torch_track_sums(outputs: Mapping, batch: Mapping) -> dict:
    """train/loss.py's track_sums (the loss halves only): per track, the summed loss over its
    masked positions. `outputs` maps the model output names to tensors."""
    import torch
    import torch.nn.functional as F

    sums = {}
    for track, (logits_key, target_key, mask_key) in CATEGORICAL_TRACKS.items():
        target, mask = batch[target_key], batch[mask_key]
        if track == "function":
            mask = mask[..., None] & (target != T.FUNCTION_PAD)
        x = outputs[logits_key].float()
        ce = torch.logsumexp(x, dim=-1) - x.gather(-1, target[..., None]).squeeze(-1)
        sums[track] = (ce * mask.float()).sum()
    logits_key, target_key, mask_key = RESIDUE_KEYS
    x = outputs[logits_key].float()
    ids = batch[target_key]
    earlier_same = torch.tril(ids[..., :, None] == ids[..., None, :], diagonal=-1).any(dim=-1)
    listed = (ids != T.RESIDUE_PAD) & ~earlier_same
    positive_sum = torch.where(listed, x.gather(-1, ids), torch.zeros((), dtype=x.dtype)).sum(-1)
    bce = (F.softplus(x).sum(-1) - positive_sum) / x.shape[-1]
    sums["residue_annotation"] = (bce * batch[mask_key].float()).sum()
    return sums


def torch_weighted_loss(sums: Mapping, counts: Mapping, weights: Mapping[str, float]):
    """train/loss.py's weighted_loss: sum_t w_t * loss_sum_t / max(count_t, 1)."""
    total = 0.0
    for track in TRACKS:
        if weights[track]:
            total = total + weights[track] * sums[track] / counts[track].clamp(min=1.0)
    return total


OUTPUT_NAMES = ("sequence_logits", "structure_logits", "secondary_structure_logits", "sasa_logits",
                "function_logits", "residue_logits")


def masked_lm_loss_torch(model, batch: Mapping, weights: Mapping[str, float]):
    """The reference's forward on the batch's model inputs, then our objective on its logits."""
    out = model(**{k: batch[k] for k in INPUT_KEYS})
    outputs = {name: getattr(out, name) for name in OUTPUT_NAMES}
    return torch_weighted_loss(torch_track_sums(outputs, batch), torch_loss_counts(batch), weights)


def decay_flags(params, no_decay_patterns: tuple[str, ...], model_cfg) -> dict[str, bool]:
    """Per reference parameter name: does AdamW decay it, by the config's no_decay_patterns as the
    JAX optimizer applies them. The JAX mask is mapped to torch names through the weight
    conversion itself (esm3_params_to_torch), so the two sides cannot disagree on a name."""
    import jax

    from esm3_jax.compat.esm3_weights import esm3_params_to_torch
    from esm3_jax.train.optim import weight_decay_mask

    mask = weight_decay_mask(params, no_decay_patterns)
    as_float = jax.tree.map(lambda p, m: np.full(p.shape, float(m), np.float32), params, mask)
    flags = {}
    for name, a in esm3_params_to_torch(as_float, model_cfg).items():
        if np.any(a != a.flat[0]):
            raise ValueError(f"{name}: its elements come from JAX leaves with different weight-decay flags")
        flags[name] = bool(a.flat[0])
    return flags


class TorchTrainStep:
    """forward + backward + clip + AdamW on a reference ESM3, eager or under torch.compile.

    The learning rate of step k is the config's schedule at k (the JAX optimizer's own schedule
    function), set on the optimizer before each step. AdamW is torch's fused CPU kernel, the
    fastest update torch offers on a CPU.
    """

    def __init__(self, model, batch: Mapping, cfg, decay: Mapping[str, bool], compile: bool):
        import torch

        from esm3_jax.train.optim import learning_rate_schedule

        tc = cfg.train
        self.model = model.train()
        self.batch = batch
        self.weights = tc.loss_weights.as_dict()
        self.clip = tc.grad_clip_norm
        self.schedule = learning_rate_schedule(tc)
        named = dict(model.named_parameters())
        groups = [dict(params=[p for n, p in named.items() if decay[n]], weight_decay=tc.weight_decay),
                  dict(params=[p for n, p in named.items() if not decay[n]], weight_decay=0.0)]
        self.opt = torch.optim.AdamW(groups, lr=float(self.schedule(0)), betas=(tc.b1, tc.b2), eps=tc.eps, fused=True)
        self.params = [p for p in model.parameters()]
        loss = lambda m, b: masked_lm_loss_torch(m, b, self.weights)
        self.loss_fn = torch.compile(loss) if compile else loss
        self.step_count = 0

    def __call__(self) -> float:
        import torch

        lr = float(self.schedule(self.step_count))
        for g in self.opt.param_groups:
            g["lr"] = lr
        self.opt.zero_grad(set_to_none=True)
        loss = self.loss_fn(self.model, self.batch)
        loss.backward()
        if self.clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.clip)
        self.opt.step()
        self.step_count += 1
        return float(loss.detach())

    def state_numpy(self) -> dict[str, np.ndarray]:
        return {k: v.detach().numpy().copy() for k, v in self.model.state_dict().items()}


def update_agreement(before: Mapping[str, np.ndarray], ours: Mapping[str, np.ndarray],
                     theirs: Mapping[str, np.ndarray], lr: float) -> dict[str, float]:
    """How well one optimizer step agrees, per element, in units of the learning rate.

    Adam's first step moves each weight by about lr * sign(gradient) (plus decay): a gradient
    within rounding of zero can take either sign, so the check is the share of elements whose
    two updates agree to 1% of lr, and the largest disagreement, both over every parameter.
    """
    n = agree = 0
    worst = 0.0
    for k, b in before.items():
        d = np.abs((ours[k] - b) - (theirs[k] - b)) / lr
        n += d.size
        agree += int(np.count_nonzero(d <= 0.01))
        worst = max(worst, float(d.max()))
    return dict(update_agreement=agree / n, update_max_diff_in_lr=worst)


def timed(fn) -> tuple[object, float]:
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0
