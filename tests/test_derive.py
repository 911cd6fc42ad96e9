"""Derivation: almost-everywhere derivatives, the convention at kinks, kink discovery, and
proof that the verification stage catches a wrong derivative or a wrong kernel."""
import dataclasses
import math

import mpmath
import numpy as np
import sympy as sp

import lossgen
from lossgen.derive import almost_everywhere, derive, differentiate, kink_expressions
from lossgen.spec import spec_from_dict
from lossgen.verify import check_derivatives, check_kernels, evaluate, parameter_sets, sample_points

from conftest import derivation_of


def _spec(expr, params=None, **inputs):
    inputs = inputs or {"y": {"role": "target"}, "p": {"role": "prediction"}}
    return spec_from_dict({"name": "t", "inputs": inputs, "params": params or {}, "loss": {"expr": expr}}, "t.toml")


def test_dirac_delta_terms_are_dropped():
    d = derive(_spec("Abs(p - y)"))
    assert d.grad[0] == sp.sign(d.spec.symbols["p"] - d.spec.symbols["y"])
    assert d.hess[0] == 0
    x = sp.Symbol("x", real=True)
    assert almost_everywhere(sp.DiracDelta(x) * 3 + x) == x


def test_kink_conventions_match_pytorch_where_it_has_the_loss():
    # torch.nn.functional.l1_loss backward at p == y is sign(0) = 0.
    assert lossgen.get("mae").grad(np.array([2.0]), np.array([2.0]))[0] == 0.0
    # l1 penalty: d|w|/dw = 0 at w = 0, like torch.abs.
    assert lossgen.get("l1_penalty").grad(np.array([0.0]), lambda1=3.0)[0] == 0.0
    # Max at a tie: Heaviside(0) = 1/2 averages the two sides, like torch.maximum:
    # d/dp Max(tau (y - p), (tau - 1)(y - p)) = (-tau + 1 - tau)/2 = 1/2 - tau at p == y.
    tau = 0.3
    assert math.isclose(lossgen.get("quantile").grad(np.array([1.0]), np.array([1.0]), tau=tau)[0], 0.5 - tau)
    # Piecewise takes the first branch whose condition holds: Huber (torch's |r| < delta)
    # is linear at |r| == delta, so its Hessian there is 0, and 1 just inside.
    huber = lossgen.get("huber")
    assert huber.hess(np.array([0.0, 0.0]), np.array([2.0, 1.9999]), delta=2.0).tolist() == [0.0, 1.0]


def test_derivatives_are_tidied_without_cancellation():
    """Charbonnier's Hessian is epsilon^2 / (r^2 + epsilon^2)^(3/2), not the difference of
    two nearly equal terms that SymPy's raw derivative gives."""
    d = derivation_of("charbonnier")
    r = d.spec.symbols["p"] - d.spec.symbols["y"]
    eps = d.spec.symbols["epsilon"]
    assert sp.simplify(d.hess[0] - eps**2 / (r**2 + eps**2) ** sp.Rational(3, 2)) == 0
    assert not isinstance(d.hess[0], sp.Add)


def test_kinks_are_found_in_abs_max_and_piecewise_conditions():
    huber = derivation_of("huber")
    p, y, delta = (huber.spec.symbols[n] for n in ("p", "y", "delta"))
    kinks = set(kink_expressions(huber))
    assert p - y in kinks and delta - sp.Abs(p - y) in kinks
    quantile = derivation_of("quantile")
    assert {sp.factor(k) for k in kink_expressions(quantile)} == {sp.factor(quantile.spec.symbols["p"] - quantile.spec.symbols["y"])}
    assert kink_expressions(derivation_of("mse")) == []


def test_derivatives_of_several_predictions():
    spec = _spec("a**2*b + exp(a - b)", a={"role": "prediction"}, b={"role": "prediction"})
    d = derive(spec)
    a, b = spec.symbols["a"], spec.symbols["b"]
    assert sp.simplify(d.grad[0] - (2 * a * b + sp.exp(a - b))) == 0
    assert sp.simplify(d.grad[1] - (a**2 - sp.exp(a - b))) == 0
    assert sp.simplify(d.hess[0] - (2 * b + sp.exp(a - b))) == 0
    assert sp.simplify(d.hess[1] - sp.exp(a - b)) == 0
    assert d.outputs("grad_hess") == [d.grad[0], d.grad[1], d.hess[0], d.hess[1]]


def test_differentiate_rejects_what_sympy_cannot_differentiate():
    x = sp.Symbol("x", real=True)
    f = sp.Function("f")
    try:
        differentiate(f(x), x)
    except ValueError as error:
        assert "could not differentiate" in str(error)
    else:
        raise AssertionError("an unevaluated Derivative must not reach the kernels")


def test_finite_difference_check_catches_a_wrong_gradient():
    d = derivation_of("log_cosh")
    wrong = dataclasses.replace(d, grad=(d.grad[0] * (1 + sp.Rational(1, 10**6)),))
    params = parameter_sets(d.spec)[0]
    points = sample_points(d, params, n=20)
    assert max(r.max_error for r in check_derivatives(d, points, params)) < 1e-15
    errors = {r.output: r.max_error for r in check_derivatives(wrong, points, params)}
    assert 5e-7 < errors["grad[p] vs finite differences"] < 2e-6


def test_kernel_check_catches_a_kernel_that_is_off_by_one_part_in_1e10():
    d = derivation_of("poisson")
    shifted_truth = dataclasses.replace(d, loss=d.loss * (1 + sp.Rational(1, 10**10)))
    params = parameter_sets(d.spec)[0]
    points = sample_points(d, params, n=20)
    assert all(r.ok() for r in check_kernels(lossgen.get("poisson"), d, points, params))
    rows = check_kernels(lossgen.get("poisson"), shifted_truth, points, params)
    loss_row = next(r for r in rows if r.output == "loss")
    assert not loss_row.ok() and 0.9e-10 < loss_row.max_error < 1.1e-10


def test_kernel_check_counts_nan_where_the_truth_is_finite():
    d = derivation_of("mse")
    params = parameter_sets(d.spec)[0]
    points = sample_points(d, params, n=10)

    class NanLoss:
        inputs, predictions = ("y", "p"), ("p",)

        def __getattr__(self, name):
            real = getattr(lossgen.get("mse"), name)

            def poisoned(*args, **kwargs):
                result = real(*args, **kwargs)
                first = result[0] if isinstance(result, tuple) else result
                first[0] = np.nan
                return result
            return poisoned

    rows = check_kernels(NanLoss(), d, points, params)
    assert all(r.spurious_nonfinite >= 1 and not r.ok() for r in rows if r.output == "loss")


def test_truth_is_resolved_where_a_cancelled_part_is_divided_by():
    """sigmoid(-x)/(1 - sigmoid(x)) is 1 for every x, but at x = 1000 the denominator is
    1 - (1 - e**-1000), 0 at the usual precisions (e**-1000 needs 435 digits beside 1): the truth
    is evaluated again where it resolves, not left out; at x = 1e10 that is beyond the limit."""
    x = sp.Symbol("x", real=True)
    s = 1 / (1 + sp.exp(-x))
    function = sp.lambdify([x], s.subs(x, -x) / (1 - s), modules="mpmath")
    for value in (3.0, 700.0, 1000.0, -1000.0):
        assert abs(evaluate(function, [value]) - 1) < mpmath.mpf(10) ** -40
    assert evaluate(function, [1e10]) is None
    assert evaluate(sp.lambdify([x], sp.log(x), modules="mpmath"), [-1.0]) is None  # complex: undefined
