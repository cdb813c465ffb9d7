"""The generative masked-LM objective (ESM3_SPEC 7.1): per-track losses at masked positions.

Each track contributes the mean of its per-position loss over the positions its loss mask
selects: cross-entropy for the categorical tracks (sequence, structure codes, SS8, SASA, and
each of the 8 function slots), binary cross-entropy summed into a mean over the 1478 labels for
the multi-label residue annotations. The total is the weighted sum of the track means.

Every quantity is returned as a (sum, count) pair so that a caller that splits a batch into
microbatches can add the pairs up and divide once: the result equals the full-batch value.
"""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp

from esm3_jax import tokens
from esm3_jax.batch import TRACKS

# track -> (logits key in the model output, target key, loss-mask key in the batch)
CATEGORICAL_TRACKS = {
    "sequence": ("sequence_logits", "sequence_target", "sequence_loss_mask"),
    "structure": ("structure_logits", "structure_target", "structure_loss_mask"),
    "ss8": ("secondary_structure_logits", "ss8_target", "ss8_loss_mask"),
    "sasa": ("sasa_logits", "sasa_target", "sasa_loss_mask"),
    "function": ("function_logits", "function_target", "function_loss_mask"),
}
RESIDUE_KEYS = ("residue_logits", "residue_annotation_target", "residue_annotation_loss_mask")


def loss_counts(batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """Number of loss terms per track in `batch` (float32 scalars).

    Computed from the masks alone, so a train step can know the full batch's denominators
    before it runs the model on the first microbatch.
    """
    counts = {}
    for track in TRACKS:
        mask = batch[f"{track}_loss_mask"]
        if track == "function":
            # One term per (position, slot); slots holding pad carry no target.
            mask = mask[..., None] & (batch["function_target"] != tokens.FUNCTION_PAD)
        counts[track] = jnp.sum(mask, dtype=jnp.float32)
    return counts


def _categorical(logits_BxLx_V: jax.Array, target: jax.Array, mask: jax.Array):
    """Sum of CE and of correct predictions over the positions in `mask`.

    A prediction is correct when the target's logit is the largest (a tie counts as correct).
    That reuses the softmax's max instead of an argmax, a variadic reduce that XLA:CPU does not
    vectorise: 4x the cost of the whole loss for the 4096-way structure head.
    """
    x = logits_BxLx_V.astype(jnp.float32)
    m = jax.lax.stop_gradient(jnp.max(x, axis=-1))
    log_normaliser = m + jnp.log(jnp.sum(jnp.exp(x - m[..., None]), axis=-1))
    x_target = jnp.take_along_axis(x, target[..., None], axis=-1)[..., 0]
    ce = log_normaliser - x_target
    correct = x_target >= m
    mask_f = mask.astype(jnp.float32)
    return jnp.sum(ce * mask_f), jnp.sum(correct * mask_f)


def _residue_annotations(logits_BxLxR: jax.Array, ids_BxLx16: jax.Array, mask_BxL: jax.Array):
    """Multi-label BCE against the multi-hot set of the listed annotation ids (pad 0 excluded).

    The multi-hot (B, L, 1478) target is never materialised: with y in {0,1},
    BCE(x, y) = softplus(x) - x*y, and sum_c x_c*y_c is the sum of x at the (unique, non-pad)
    listed ids. The per-position loss is the mean over the 1478 labels. A position counts as
    correct when the predicted set {c : x_c >= 0} equals the target set exactly.
    """
    x = logits_BxLxR.astype(jnp.float32)
    n_labels = x.shape[-1]
    ids = ids_BxLx16
    # An id listed twice counts once: keep the first occurrence of each.
    earlier_same = jnp.tril(ids[..., :, None] == ids[..., None, :], k=-1).any(axis=-1)
    listed = (ids != tokens.RESIDUE_PAD) & ~earlier_same  # (B, L, 16)
    x_at_ids = jnp.take_along_axis(x, ids, axis=-1)  # (B, L, 16)
    positive_sum = jnp.sum(jnp.where(listed, x_at_ids, 0.0), axis=-1)
    bce = (jnp.sum(jax.nn.softplus(x), axis=-1) - positive_sum) / n_labels
    n_predicted = jnp.sum(x >= 0, axis=-1)
    n_listed = jnp.sum(listed, axis=-1)
    hits = jnp.sum(listed & (x_at_ids >= 0), axis=-1)
    exact = (n_predicted == n_listed) & (hits == n_listed)
    mask_f = mask_BxL.astype(jnp.float32)
    return jnp.sum(bce * mask_f), jnp.sum(exact * mask_f)


def track_sums(outputs: Mapping[str, jax.Array], batch: Mapping[str, jax.Array]) -> dict[str, tuple]:
    """Per track: (summed loss, summed correct) over the masked positions of this (micro)batch."""
    sums = {}
    for track, (logits_key, target_key, mask_key) in CATEGORICAL_TRACKS.items():
        target, mask = batch[target_key], batch[mask_key]
        if track == "function":
            mask = mask[..., None] & (target != tokens.FUNCTION_PAD)  # (B, L, 8)
        sums[track] = _categorical(outputs[logits_key], target, mask)
    logits_key, target_key, mask_key = RESIDUE_KEYS
    sums["residue_annotation"] = _residue_annotations(outputs[logits_key], batch[target_key], batch[mask_key])
    return sums


def weighted_loss(sums: Mapping[str, tuple], counts: Mapping[str, jax.Array], weights: Mapping[str, float]):
    """sum_t w_t * loss_sum_t / count_t. A track with no masked positions contributes 0."""
    total = jnp.zeros((), jnp.float32)
    for track in TRACKS:
        w = weights[track]
        if w:
            total = total + w * sums[track][0] / jnp.maximum(counts[track], 1.0)
    return total


def metrics_from_sums(sums: Mapping[str, tuple], counts: Mapping[str, jax.Array], weights) -> dict[str, jax.Array]:
    """loss, accuracy and perplexity per track, plus the weighted total, as float32 scalars.

    A track with no masked positions in the batch reports NaN (not 0), so that averaging over
    steps in a dashboard is not pulled towards a loss that was never measured.
    """
    out = {"loss": weighted_loss(sums, counts, weights)}
    for track in TRACKS:
        n = counts[track]
        present = n > 0
        loss = jnp.where(present, sums[track][0] / jnp.maximum(n, 1.0), jnp.nan)
        out[f"{track}/loss"] = loss
        out[f"{track}/accuracy"] = jnp.where(present, sums[track][1] / jnp.maximum(n, 1.0), jnp.nan)
        out[f"{track}/perplexity"] = jnp.exp(loss)
        out[f"{track}/count"] = n
    return out


def masked_lm_loss(outputs: Mapping[str, jax.Array], batch: Mapping[str, jax.Array], weights: Mapping[str, float]):
    """(total loss, metrics) of one batch: the objective in one call, for evaluation and tests."""
    counts = loss_counts(batch)
    sums = track_sums(outputs, batch)
    metrics = metrics_from_sums(sums, counts, weights)
    return metrics["loss"], metrics
