"""Held-out evaluation during training: the jitted eval step and the per-track NLL pass over
`train.eval_batches` batches, and the validation line the loop prints."""

from __future__ import annotations

import flax.linen as nn
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from esm3_jax.batch import TRACKS
from esm3_jax.runtime import cpu_matmul as cpu_matmul_lib
from esm3_jax.train import loss as loss_lib
from esm3_jax.train import sharding as shd
from esm3_jax.train.step import InContext, model_inputs, platform_of


def make_eval_step(model: nn.Module, params_shardings, batch_shardings, mesh: Mesh, rules, cpu_matmul: str = cpu_matmul_lib.DEFAULT):
    """`(params, batch) -> per-track (loss sum, correct sum) and counts`, for NLL over many batches."""

    def eval_step(params, batch):
        outputs = model.apply({"params": params}, **model_inputs(batch))
        return loss_lib.track_sums(outputs, batch), loss_lib.loss_counts(batch)

    jitted = jax.jit(eval_step, in_shardings=(params_shardings, batch_shardings),
                     out_shardings=NamedSharding(mesh, P()),
                     compiler_options=cpu_matmul_lib.compiler_options(platform_of(mesh), cpu_matmul))
    return InContext(jitted, mesh, rules)


def eval_pass(eval_step, params, make_eval_iter, n_batches, batch_shardings, rows) -> dict[str, float]:
    """Per-track NLL (mean loss over masked positions) and accuracy over `n_batches` held-out batches."""
    it = make_eval_iter()
    loss_sum = {t: 0.0 for t in TRACKS}
    correct = {t: 0.0 for t in TRACKS}
    count = {t: 0.0 for t in TRACKS}
    for _ in range(n_batches):
        batch = shd.global_batch(next(it), batch_shardings, rows)
        sums, counts = jax.device_get(eval_step(params, batch))
        for t in TRACKS:
            loss_sum[t] += float(sums[t][0])
            correct[t] += float(sums[t][1])
            count[t] += float(counts[t])
    # A track with no masked labelled position in the held-out batches (no function annotations
    # in the split, say) has no NLL: it is left out rather than reported as nan.
    out = {}
    for t in TRACKS:
        if count[t]:
            out[f"{t}/nll"] = loss_sum[t] / count[t]
            out[f"{t}/accuracy"] = correct[t] / count[t]
    return out


def format_eval(eval_metrics: dict[str, float]) -> str:
    """The validation line: each track's NLL, then the tracks `eval_pass` had no labels for."""
    shown, missing = [], []
    for t in TRACKS:
        nll = eval_metrics.get(f"{t}/nll")
        if nll is None:
            missing.append(t)
        else:
            shown.append(f"{t}={nll:.3f}")
    return " ".join(shown) + (f" (no held-out labels: {', '.join(missing)})" if missing else "")
