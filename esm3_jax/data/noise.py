"""Mask-rate noise schedules (ESM3_SPEC section 7.2). Pure numpy.

ESM3 masks each track of each protein at its own rate, drawn afresh per protein from the track's
schedule, so the model learns every masking level from "nearly nothing hidden" to "everything
hidden" (that is what makes iterative any-order generation work). A schedule here is a
distribution over the mask rate r in [0, 1]:

- the "t-schedules" map t ~ U(0, 1) through a decreasing function f, r = f(t), as in the released
  code's registry: cosine cos(pi t / 2), cubic 1 - t^3, square_root 1 - sqrt(t), linear 1 - t,
  square 1 - t^2;
- betalinear30 draws r ~ Beta(3, 9) with probability 0.8 and r ~ U(0, 1) otherwise, mean 0.30.

`mask_rate_cdf` and `mean_mask_rate` give the exact distribution of r, so tests (and anyone
tuning a config) can check sampled rates against it.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np

_T_SCHEDULES: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "cosine": lambda t: np.cos(t * (np.pi / 2)),
    "cubic": lambda t: 1.0 - t**3,
    "square_root": lambda t: 1.0 - np.sqrt(t),
    "linear": lambda t: 1.0 - t,
    "square": lambda t: 1.0 - t**2,
    # Rate 0: nothing masked. Not a training schedule: what `esm3-jax evaluate` reads noise-free
    # batches with (the same proteins and crops as at the training noise, every track intact).
    "none": lambda t: np.zeros_like(t),
}
# Inverses f^{-1}(r) of the maps above: P(R <= r) = P(t >= f^{-1}(r)) = 1 - f^{-1}(r).
_T_INVERSES: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "cosine": lambda r: np.arccos(r) * (2 / np.pi),
    "cubic": lambda r: np.cbrt(1.0 - r),
    "square_root": lambda r: (1.0 - r) ** 2,
    "linear": lambda r: 1.0 - r,
    "square": lambda r: np.sqrt(1.0 - r),
    "none": lambda r: np.zeros_like(r),
}
_BETALINEAR_BETA_WEIGHT = 0.8
_BETALINEAR_A, _BETALINEAR_B = 3, 9

SCHEDULES: tuple[str, ...] = ("betalinear30", *_T_SCHEDULES)


def check_schedule(name: str) -> None:
    if name not in SCHEDULES:
        raise ValueError(f"unknown noise schedule {name!r}; known: {list(SCHEDULES)}")


def sample_mask_rate(name: str, rng: np.random.Generator, size: int | tuple[int, ...] | None = None):
    """Draw mask rates in [0, 1] from schedule `name` (a float for size=None, else an array)."""
    check_schedule(name)
    if name == "betalinear30":
        beta = rng.beta(_BETALINEAR_A, _BETALINEAR_B, size)
        uniform = rng.random(size)
        use_beta = rng.random(size) < _BETALINEAR_BETA_WEIGHT
        return np.where(use_beta, beta, uniform) if size is not None else float(beta if use_beta else uniform)
    rate = _T_SCHEDULES[name](rng.random(size))
    return rate if size is not None else float(rate)


def _beta_3_9_cdf(r: np.ndarray) -> np.ndarray:
    # For integer a, b the regularised incomplete beta is a binomial tail:
    # I_r(a, b) = sum_{j=a}^{a+b-1} C(a+b-1, j) r^j (1-r)^(a+b-1-j).
    n = _BETALINEAR_A + _BETALINEAR_B - 1
    return sum(math.comb(n, j) * r**j * (1.0 - r) ** (n - j) for j in range(_BETALINEAR_A, n + 1))


def mask_rate_cdf(name: str, r) -> np.ndarray:
    """Exact P(rate <= r) under schedule `name`."""
    check_schedule(name)
    r = np.clip(np.asarray(r, dtype=np.float64), 0.0, 1.0)
    if name == "betalinear30":
        return _BETALINEAR_BETA_WEIGHT * _beta_3_9_cdf(r) + (1 - _BETALINEAR_BETA_WEIGHT) * r
    return 1.0 - _T_INVERSES[name](r)


def mean_mask_rate(name: str) -> float:
    """Exact E[rate] under schedule `name` (cosine 2/pi, cubic 3/4, square_root 1/3, ...)."""
    check_schedule(name)
    if name == "betalinear30":
        beta_mean = _BETALINEAR_A / (_BETALINEAR_A + _BETALINEAR_B)
        return _BETALINEAR_BETA_WEIGHT * beta_mean + (1 - _BETALINEAR_BETA_WEIGHT) * 0.5
    return {"cosine": 2 / math.pi, "cubic": 3 / 4, "square_root": 1 / 3, "linear": 1 / 2, "square": 2 / 3, "none": 0.0}[name]


def sample_mask(name: str, eligible_L: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Mask each eligible position independently at one rate drawn from `name`; (L,) bool.

    Bernoulli masking (rather than exactly round(r * n) positions) keeps the expected masked
    fraction equal to the schedule's rate for every length, including very short proteins.
    """
    rate = sample_mask_rate(name, rng)
    return eligible_L & (rng.random(eligible_L.shape) < rate)
