"""Every loss of the catalog: kernels against the mpmath truth, derivatives against finite
differences, reductions, weights and float32.

The truth is the spec's SymPy expression (before stabilisation) evaluated at >= 50 digits;
finite differences are of the loss itself, so a wrong derivation fails as well as a wrong
kernel.
"""
import math

import numpy as np
import pytest

import lossgen
from lossgen.verify import RELATIVE_TOLERANCE, format_report, sample_domain, verify_derivatives, verify_loss

from conftest import CATALOG_NAMES, derivation_of

ISSUE_2_CATALOG = {
    "mse", "mae", "smooth_l1", "huber", "pseudo_huber", "charbonnier", "msle", "log_cosh",
    "cauchy", "cauchy_rho", "quantile", "poisson", "l1_penalty", "l2_penalty", "elastic_net",
}


def test_catalog_holds_the_elementwise_losses():
    assert ISSUE_2_CATALOG <= set(CATALOG_NAMES)
    assert set(CATALOG_NAMES) == set(lossgen.available())


@pytest.mark.parametrize("name", CATALOG_NAMES)
def test_kernels_match_high_precision_truth(name):
    """Random points and the stress grid (0, +-1e-300, ..., +-745, +-1e300; probabilities at
    0, 1e-300, 1e-16, 1 - 1e-16, 1), and every kink with its neighbours."""
    rows = verify_loss(lossgen.get(name), derivation_of(name), n=200, stress=True)
    assert {r.output.split("[")[0] for r in rows} == {"loss", "grad", "hess"}
    assert all(r.points >= 200 for r in rows)
    failures = [r for r in rows if not r.ok(RELATIVE_TOLERANCE)]
    assert not failures, "\n" + format_report(failures)


@pytest.mark.parametrize("name", CATALOG_NAMES)
def test_derivation_matches_finite_differences(name):
    rows = verify_derivatives(derivation_of(name), n=60)
    for row in rows:
        assert row.points >= 30, f"{row.output}: only {row.points} points away from kinks"
        assert row.max_error <= 1e-15, "\n" + format_report([row])


def _inputs(loss_name, n, seed=1):
    rng = np.random.default_rng(seed)
    spec = derivation_of(loss_name).spec
    return [sample_domain(i.domain, n, rng) for i in spec.inputs], rng


@pytest.mark.parametrize("name", CATALOG_NAMES)
def test_reductions_and_sample_weight(name):
    loss = lossgen.get(name)
    arrays, rng = _inputs(name, 1000)
    weight = rng.uniform(0.1, 3.0, 1000)
    per_element = loss.loss(*arrays, reduction="none")
    finite = np.isfinite(per_element)
    arrays = [a[finite] for a in arrays]
    weight, per_element = weight[finite], per_element[finite]

    assert math.isclose(loss.loss(*arrays, reduction="sum"), math.fsum(per_element), rel_tol=1e-12)
    assert math.isclose(loss.loss(*arrays), math.fsum(per_element) / len(per_element), rel_tol=1e-12)
    weighted = loss.loss(*arrays, reduction="none", sample_weight=weight)
    np.testing.assert_allclose(weighted, weight * per_element, rtol=1e-15)
    expected_mean = math.fsum(weight * per_element) / math.fsum(weight)
    assert math.isclose(loss.loss(*arrays, sample_weight=weight), expected_mean, rel_tol=1e-12)
    assert math.isclose(loss.loss(*arrays, reduction="sum", sample_weight=weight),
                        math.fsum(weight * per_element), rel_tol=1e-12)

    grad, hess = loss.grad(*arrays), loss.hess(*arrays)
    weighted_grad, weighted_hess = loss.grad_hess(*arrays, sample_weight=weight)
    np.testing.assert_allclose(weighted_grad, weight * grad, rtol=1e-15)
    np.testing.assert_allclose(weighted_hess, weight * hess, rtol=1e-15)
    fused_loss, fused_grad, fused_hess = loss.loss_grad_hess(*arrays)
    np.testing.assert_array_equal(fused_loss, per_element)
    np.testing.assert_array_equal(fused_grad, grad)
    np.testing.assert_array_equal(fused_hess, hess)


@pytest.mark.parametrize("name", CATALOG_NAMES)
def test_float32_inputs_give_float32_results_close_to_float64(name):
    loss = lossgen.get(name)
    arrays, _ = _inputs(name, 500, seed=2)
    single = [a.astype(np.float32) for a in arrays]
    results32 = loss.loss_grad_hess(*single)
    results64 = loss.loss_grad_hess(*[a.astype(np.float64) for a in single])
    for r32, r64 in zip(results32, results64):
        assert r32.dtype == np.float32
        ok = np.isfinite(r64) & (np.abs(r64) < np.finfo(np.float32).max)
        scale = np.max(np.abs(r64[ok]), initial=1.0)
        np.testing.assert_allclose(r32[ok], r64[ok], rtol=1e-5, atol=1e-6 * scale)
