"""Noise schedules: sampled mask rates follow each schedule's exact distribution (ESM3_SPEC 7.2)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from esm3_jax.data import noise as N


@pytest.mark.parametrize("name", [n for n in N.SCHEDULES if n != "none"])
def test_sampled_rates_follow_the_schedule(name):
    rates = N.sample_mask_rate(name, np.random.default_rng(123), size=20_000)
    assert rates.min() >= 0.0 and rates.max() <= 1.0
    # Kolmogorov-Smirnov against the exact CDF: a wrong map, inverse or mixture weight fails this.
    result = stats.kstest(rates, lambda r: N.mask_rate_cdf(name, r))
    assert result.pvalue > 1e-3, f"{name}: KS statistic {result.statistic:.4f}"
    assert abs(rates.mean() - N.mean_mask_rate(name)) < 0.01
    # Scalar draws come from the same distribution as array draws.
    scalar = [N.sample_mask_rate(name, np.random.default_rng(i)) for i in range(2000)]
    assert all(isinstance(r, float) for r in scalar)
    assert stats.kstest(scalar, lambda r: N.mask_rate_cdf(name, r)).pvalue > 1e-3


def test_means_and_cdfs_agree_with_independent_formulas():
    assert N.mean_mask_rate("betalinear30") == pytest.approx(0.30)
    assert N.mean_mask_rate("cosine") == pytest.approx(2 / math.pi)  # E[cos(pi t/2)], t ~ U(0,1)
    r = np.linspace(0, 1, 101)
    np.testing.assert_allclose(
        N.mask_rate_cdf("betalinear30", r), 0.8 * stats.beta(3, 9).cdf(r) + 0.2 * r, atol=1e-12
    )
    for name in N.SCHEDULES:  # the mean is the integral of the survival function
        cdf = N.mask_rate_cdf(name, np.linspace(0, 1, 200_001))
        assert np.trapezoid(1 - cdf, dx=1 / 200_000) == pytest.approx(N.mean_mask_rate(name), abs=1e-4)
    # The maintainers' remark on betalinear30: a 25% mask rate is likelier than 75%.
    pdf = lambda x: (N.mask_rate_cdf("betalinear30", x + 1e-4) - N.mask_rate_cdf("betalinear30", x - 1e-4))
    assert pdf(0.25) > 3 * pdf(0.75)


def test_the_none_schedule_masks_nothing():
    rng = np.random.default_rng(0)
    assert N.sample_mask_rate("none", rng) == 0.0 and N.mean_mask_rate("none") == 0.0
    assert not N.sample_mask("none", np.ones(50, bool), rng).any()
    assert (N.mask_rate_cdf("none", np.linspace(0, 1, 5)) == 1.0).all()


def test_sample_mask_respects_eligibility_and_rate():
    rng = np.random.default_rng(0)
    eligible = np.ones(300, bool)
    eligible[[0, 150, 299]] = False  # BOS, a chain break, EOS
    fractions = []
    for _ in range(3000):
        m = N.sample_mask("square_root", eligible, rng)
        assert not m[~eligible].any()
        fractions.append(m[eligible].mean())
    assert np.mean(fractions) == pytest.approx(1 / 3, abs=0.01)


def test_unknown_schedule_is_refused():
    with pytest.raises(ValueError, match="unknown noise schedule 'cosin'"):
        N.sample_mask_rate("cosin", np.random.default_rng(0))
