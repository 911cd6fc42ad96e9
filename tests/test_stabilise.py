"""The rewrite rules: each fires on its pattern, keeps the exact value (checked with mpmath
at 60 digits), and where its replacement is made of `math` functions, is more accurate in
float64 than the original at the point that motivates it."""
import functools
import math
import types

import mpmath
import numpy as np
import numba
import pytest
import sympy as sp
from sympy.codegen.cfunctions import expm1, log1p

from lossgen.emit import HELPERS, template_environment
from lossgen.stabilise import (HUGE, LAST_RULES, RULES, apply_last, invert_for_huge, parameters_at_zero,
                               split_cancellations, stabilise, unit_interval)
from lossgen.verify import evaluate, relative_error
from lossgen.vocabulary import MPMATH_IMPLEMENTATIONS, finite_or, logcosh, sigmoid, softplus, xlogy

x = sp.Symbol("x", real=True)
y = sp.Symbol("y", positive=True)
w = sp.Symbol("w", positive=True)
z = sp.Symbol("z", real=True)
b = sp.Symbol("b", real=True)
a = sp.Symbol("a", nonnegative=True)  # with p: in [0, 1] where a rule is told so (IN_UNIT_INTERVAL)
p = sp.Symbol("p", nonnegative=True)

# rule name -> (expression, a point where the original loses accuracy in float64)
EXAMPLES = {
    "log1p": (sp.log(1 + x**2), {x: 1e-9}),
    "expm1": (2 - 2 * sp.exp(-x**2), {x: 1e-7}),
    "softplus": (sp.log(1 + sp.exp(x)), {x: 800.0}),
    "logcosh": (sp.log(sp.cosh(x)), {x: 800.0}),
    "tanh": (sp.sinh(x) / sp.cosh(x), {x: 800.0}),
    "pythagoras": ((sp.cosh(x) ** 2 - sp.sinh(x) ** 2) / sp.cosh(x) ** 2, {x: 30.0}),
    "sech2": (1 - sp.tanh(x) ** 2, {x: 30.0}),
    "hypot": (sp.sqrt(x**2 + y**2), {x: 1e200, y: 1.0}),
    "sqrt1pm1": (sp.sqrt(1 + x**2) - 1, {x: 1e-9}),
    "sigmoid_complement": (1 - sigmoid(x), {x: 40.0}),
    "log_sigmoid": (sp.log(sigmoid(x)), {x: -800.0}),
    "logistic": (1 / (1 + sp.exp(-x)), {x: -710.0}),
    "logistic_ratio": (sp.exp(x) / (1 + sp.exp(x)), {x: 710.0}),
    "logaddexp": (sp.log(sp.exp(x) + sp.exp(y)), {x: 800.0, y: 799.0}),
    "difference_of_squares": (x**2 - y**2, {x: 1e8 + 1, y: 1e8}),
    # d/dx sin(z + acos(x))/sqrt(1 - x**2) = sin(z)/(1 - x**2)**1.5, the difference of two terms
    # of size 1 (ArcFace's logit at margin z = 1e-20): 3e-20
    "angle_through_acos": (sp.diff(sp.sin(z + sp.acos(x)) / sp.sqrt(1 - x**2), x), {x: 0.6, z: 1e-20}),
    # Barron's Hessian numerator at alpha = -1e12, |x| = c + 1e-8: two terms of 1e12 leave -2e4
    "weighted_squares": (y**2 * sp.Abs(z - 2) - x**2 * (1 - z), {x: 1 + 1e-8, y: 1.0, z: -1e12}),
    "exact_sum": (x + y - z - b, {x: 1.0, y: 1e-20, z: 1.0, b: 1e-300}),
    "hypot_minus_one": (sp.sqrt(1 + x**2) - 1 + 0 * y, {x: 1e-9, y: 1.0}),
    "xlogy": (x * sp.log(y), {x: 0.0, y: 0.0}),
    "heaviside_select": (sp.Heaviside(x - 1) * sp.exp(z), {x: 0.5, z: 800.0}),
    "exp_product": (z * sp.exp(x), {x: 745.0, z: -1e-300}),
    "divide_twice": (z / x**2, {x: 1e-300, z: 1e-300}),
    # sigmoid(-800) underflows: its power -1.5 is inf, times the vanishing softplus(-800) nan;
    # the product is 2.6e-127 (the focal loss's (1 - p_t)**(gamma - 1) times the cross-entropy)
    "power_log_domain": (z * sigmoid(x) ** (z - 1) * softplus(x) * (sigmoid(x) - b * sigmoid(-x)),
                         {x: -800.0, z: -0.5, b: 1e-300}),
    "distribute_to_cancel": (sigmoid(-x) * (z + sigmoid(x) / sigmoid(-x)), {x: 745.0, z: 2.0}),
    "combine_powers": ((sigmoid(x) + z) ** y / (sigmoid(x) + z), {x: -745.0, y: 2.5, z: 0.0}),
    "power_minus_one": (z * (1 + x**2) ** (y / 7) - z, {x: 1e-9, y: 0.5, z: 3.0}),
    "collect_pair": (x**2 * z - x**2 + y, {x: 1e10, z: 1.0, y: 1.0}),
    "exprel": (expm1(z * x**2) / z, {x: 0.7, z: 1e-320}),  # z*x**2 is subnormal: 3 digits left
    "log1prel": (z * log1p(x**2 / z), {x: 1e-8, z: 1e300}),  # x**2/z is subnormal: 1e-316
    "power_of_one_plus": ((1 + x**2) ** z, {x: 1e-6, z: -1e12}),  # 1 + 1e-12 rounded, then to the -1e12th
    "log1mexp": (sp.log(1 - sp.exp(-x**2)), {x: 1e-9}),  # 1 - exp(-1e-18) is 0: log(0)
    "log_difference": (z * sp.log(y + x**2) - z * sp.log(y), {x: 1e-6, y: 3.0, z: 2.0}),
    # twice the Jensen-Shannon term of y and w: about 4.4e-5; the four terms are about 0.27
    "mixture_entropy": (xlogy(y, y) - xlogy(y, (y + w) / 2) + xlogy(w, w) - xlogy(w, (y + w) / 2),
                        {y: 0.13050471177614809, w: 0.12755822648228032}),
    "divide_in_turn": (y / (w * (y + w)), {y: 1e-16, w: 1e-300}),  # w*(y + w) = 1e-316 is subnormal
    # Barron's Hessian at alpha = z = -1e100: (z - 2)**2*x**2*(z - 1) = 1e320 overflows
    "magnitude_ratio": ((z - 2)**2 * (y**2 * sp.Abs(z - 2) + (z - 1) * x**2)
                        / (sp.Abs(z - 2) * (y**2 * sp.Abs(z - 2) + x**2)**2), {x: 1e10, y: 1.0, z: -1e100}),
    # balanced_cross_entropy's tanh coefficient at alpha = 1: y/2, 0 when expanded
    "multilinear_corners": (a * p - a / 2 - p / 2 + sp.S.Half, {a: 1.0, p: 1e-300}),
}
IN_UNIT_INTERVAL = {"multilinear_corners": (a, p)}  # the symbols a rule may take to lie in [0, 1]

MODULES = [MPMATH_IMPLEMENTATIONS, "mpmath"]
PREREQUISITES = {"hypot_minus_one": ("hypot",), "logistic_ratio": ("logistic",), "log1mexp": ("log1p",)}  # rules whose pattern another rule produces


def _kernel_helpers():
    """The stable helpers exactly as generated modules define them (from the template)."""
    source = template_environment().get_template("numba_helpers.py.j2").render(
        helpers=set(HELPERS.values()) | {"exact_sum", "exprel", "log1prel"})
    # numba itself but uncached; the fused multiply-add is an intrinsic (numba.extending)
    uncached = types.SimpleNamespace(njit=lambda **options: numba.njit(**{**options, "cache": False}),
                                     extending=numba.extending, types=numba.types)
    namespace = {"math": math, "numba": uncached}
    exec(compile(source, "numba_helpers.py.j2", "exec"), namespace)  # our own template, not spec data
    helpers = {name: namespace[f"_{helper}"] for name, helper in HELPERS.items()}
    start, add, finish = (namespace[f"_sum_{step}"] for step in ("start", "add", "finish"))
    # exprel prints itself as _exprel(...) (lossgen.vocabulary), for Numba and for lambdify
    helpers["exprel"] = helpers["_exprel"] = namespace["_exprel"]
    helpers["log1prel"] = helpers["_log1prel"] = namespace["_log1prel"]
    helpers["exact_sum"] = lambda *terms: finish(functools.reduce(add, terms[1:], start(terms[0])))
    # as the kernels compute these: from one exp(-|x|) (and its log1p), or expm1(|x|) (inf beyond
    # 709, where Numba's expm1 overflows and Python's raises)
    helpers["sigmoid"] = lambda v: helpers["sigmoid_from"](v, math.exp(-abs(v)))
    helpers["softplus"] = lambda v: helpers["softplus_from"](v, math.log1p(math.exp(-abs(v))))
    helpers["logcosh"] = lambda v: helpers["logcosh_from"](v, math.expm1(abs(v)) if abs(v) < 709 else math.inf)
    return helpers


FLOAT_MODULES = [_kernel_helpers(), {"group": lambda value: value, "real_group": lambda value: value}, "math"]


def test_every_rule_has_an_example_and_a_reason():
    assert sorted(EXAMPLES) == sorted(rule.name for rule in RULES)
    for rule in RULES:
        assert rule.reason and rule.find and rule.replace


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_rule_fires_and_keeps_the_exact_value(name):
    rule = next(r for r in RULES if r.name == name)
    expr, point = EXAMPLES[name]
    before_rule = tuple(r for r in RULES if r.name in PREREQUISITES.get(name, ()))
    with unit_interval(IN_UNIT_INTERVAL.get(name, ())):
        expr = stabilise(expr, before_rule)
        rewritten = stabilise(expr, (rule,))
    assert rewritten != expr, f"rule {name} did not fire on {expr}"
    symbols = sorted(point, key=str)
    before = sp.lambdify(symbols, expr, modules=MODULES)
    after = sp.lambdify(symbols, rewritten, modules=MODULES)
    with mpmath.workdps(60):
        for scale in (0.3, 1.7, -2.2, 5.0):
            args = [mpmath.mpf(abs(scale) if s.is_positive else scale) for s in symbols]
            assert abs(before(*args) - after(*args)) <= mpmath.mpf(10) ** -50 * (1 + abs(before(*args)))


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_rewritten_form_is_accurate_in_float64(name):
    expr, point = EXAMPLES[name]
    with unit_interval(IN_UNIT_INTERVAL.get(name, ())):
        rewritten = stabilise(expr)
    symbols = sorted(point, key=str)
    args = [point[s] for s in symbols]
    truth = evaluate(sp.lambdify(symbols, rewritten, modules=MODULES), args)  # = expr, as tested above
    value = sp.lambdify(symbols, rewritten, modules=FLOAT_MODULES)(*args)
    # exp(a + log|b|) carries the rounding of a + log|b| (|a| <= 745) into its relative error,
    # as does power_log_domain's exp(e*log(B) + log|b|)
    bound = 1e-12 if name in ("exp_product", "power_log_domain") else 1e-14
    assert relative_error(value, truth) <= bound, (rewritten, value, truth)


def test_one_minus_a_square_is_factored_for_an_input_and_not_for_a_placeholder():
    """1 - x**2 -> (1 - x)*(1 + x) for a spec's symbol (exact): at x = 1 - 5.3e-9, x**2 rounds
    away x's last bits (relative error 2.6e-9 against mpmath); a placeholder's w**2 - 1 (lossgen's
    names start with _) is a computed value and stays."""
    rule = next(r for r in RULES if r.name == "difference_of_squares")
    factored = stabilise(1 - x**2, (rule,))
    assert factored == (1 - x) * (1 + x)
    at = 0.9999999947316439
    with mpmath.workdps(50):
        truth = 1 - mpmath.mpf(at) ** 2
    assert relative_error(1 - at**2, truth) > 1e-9
    assert relative_error(sp.lambdify(x, factored, modules="math")(at), truth) <= 1e-15
    placeholder = sp.Symbol("_w", real=True)
    assert stabilise(placeholder**2 - 1, (rule,)) == placeholder**2 - 1
    assert stabilise(4 - x**2, (rule,)) == (2 - x) * (2 + x)
    assert stabilise(2 - x**2, (rule,)) == 2 - x**2


def test_multilinear_corners_fires_only_where_the_corner_form_cannot_cancel():
    """The corner form where the values at the corners of [0, 1]**n share a sign and the
    monomials do not; every term then has the value's sign, and float64 keeps its digits at
    the corners' neighbours. Left alone: symbols not known to lie in [0, 1], corner values of
    both signs (p - 1/2), monomials of one sign (1 + p), a square, a coefficient that is not a
    number, more than 4 variables."""
    rule = tuple(r for r in RULES if r.name == "multilinear_corners")
    coefficient = a * p - a / 2 - p / 2 + sp.S.Half
    with unit_interval((a, p)):
        corners = stabilise(coefficient, rule)
        assert sp.expand(corners - coefficient) == 0
        assert corners == a * p / 2 + (1 - a) * (1 - p) / 2
        assert stabilise(corners, rule) == corners  # a fixed point
        assert stabilise(1 - a - p + a * p, rule) == (1 - a) * (1 - p)
        for expr in (p - sp.S.Half, 1 + p, a * p - a / 2 - p**2 / 2 + sp.S.Half, x * p - x / 2 + sp.S.Half,
                     1 - a * p + z * p):
            assert stabilise(expr, rule) == expr, expr
        many = [sp.Symbol(f"v{i}", nonnegative=True) for i in range(5)]
        with unit_interval(many):
            product_form = sp.expand(sp.Mul(*[1 - v for v in many]))
            assert stabilise(product_form, rule) == product_form
    assert stabilise(coefficient, rule) == coefficient  # outside the context: not known to be in [0, 1]
    f = sp.lambdify([a, p], corners, modules=FLOAT_MODULES)
    exact = sp.lambdify([a, p], coefficient, modules=MODULES)
    for at in ((1.0, 1e-300), (1 - 1e-10, 0.0), (1 - 1e-10, 1e-16), (0.0, 1 - 2**-53), (1e-10, 1.0), (0.3, 0.7)):
        truth = evaluate(exact, list(at))
        assert relative_error(f(*at), truth) <= 4e-16, (at, f(*at), truth)


def test_weighted_squares_takes_the_difference_from_the_larger_coefficient():
    """Without known signs both forms are kept, chosen per call by |b| <= |a|: near the zero of
    (z + 1) y**2 - z x**2, for z = 1e12 (a > 0 > b) and z = -1e12 - 1 (b > 0 > a)."""
    expr = (z + 1) * y**2 - z * x**2
    rewritten = stabilise(expr)
    assert isinstance(rewritten, sp.Piecewise) and len(rewritten.args) == 3
    symbols = [x, y, z]
    for at in ({x: 1 + 1e-8, y: 1.0, z: 1e12}, {x: 1 + 1e-8, y: 1.0, z: -1e12 - 1}, {x: 3.0, y: 1.0, z: 0.5}):
        args = [at[s] for s in symbols]
        truth = evaluate(sp.lambdify(symbols, expr, modules=MODULES), args)
        value = sp.lambdify(symbols, rewritten, modules=FLOAT_MODULES)(*args)
        assert relative_error(value, truth) <= 1e-15, (at, value, truth)


def test_weighted_squares_needs_a_symbol_to_cancel_in_the_coefficients():
    for expr in (2 * y**2 - x**2,               # numbers: nothing cancels symbolically
                 sp.Abs(z - 2) * y**2 + x**2,   # |z - 2| + 1 keeps z on both sides of 2
                 z * y**2 + (z - 1) * x**2):    # 2z - 1 keeps z
        assert not stabilise(expr, tuple(r for r in RULES if r.name == "weighted_squares")).has(sp.Piecewise), expr
    # |z - 2| + z - 1 is 1 for z < 2 (Barron's Hessian): only that branch is rewritten
    stable = stabilise(sp.Abs(z - 2) * y**2 + (z - 1) * x**2, tuple(r for r in RULES if r.name == "weighted_squares"))
    (rewritten, condition), (as_it_was, otherwise) = stable.args
    assert otherwise == sp.true and as_it_was.has(sp.Abs) and not rewritten.has(sp.Abs)
    assert condition == sp.And(z < 2, z < 1)


def test_rules_apply_inside_larger_expressions_until_nothing_changes():
    expr = 3 * sp.log(1 + sp.exp(x) - 1) + (sp.sqrt(1 + x**2) - 1) * y
    stable = stabilise(expr)
    assert stabilise(stable) == stable
    assert not stable.has(sp.log) and not stable.has(sp.exp)


# --- splits: cancellation between terms of a sum ------------------------------------------

SPLIT_EXAMPLES = [
    # (expression, point): the issue's example first: softplus(r) - y r at y = 1, r = 40 is 4.2e-18
    (softplus(x) - b * x, {x: 40.0, b: 1.0}),
    (softplus(x) - b * x, {x: -40.0, b: 0.0}),
    (sigmoid(x) - b, {x: 40.0, b: 1.0}),
    (sigmoid(x) - b, {x: 1e-8, b: 0.5}),
    (sigmoid(x) - b, {x: -745.0, b: 0.0}),
    (2 * sigmoid(-x) * b - (1 - b) * sigmoid(x), {x: 1e-9, b: 1 / 3}),
    (sp.exp(x) - b, {x: 1e-300, b: 1.0}),
    (sp.exp(x) - b * x, {x: 1e-300, b: 1e300}),  # 1 - b x with an exact product (fma)
    # two splits of one argument in one sum: softplus(-x) + sigmoid(-x) is left
    (softplus(x) - b * x - sigmoid(x) + b, {x: 40.0, b: 1.0}),
    # the split parts under a common factor: F*(1 - b) - F*sigmoid(-x), as in the focal loss's
    # gradient under (1 - p_t)**gamma
    (sp.expand(sp.cosh(z) * (sigmoid(x) - b)), {x: 40.0, b: 1 - 2.0**-53, z: 0.5}),
    (sp.expand(sp.cosh(z) * (sigmoid(x) - b * sigmoid(x) - b * sigmoid(-x))), {x: 1e-300, b: 0.5, z: 0.5}),
    # a split function as the common factor: split over z, then each branch over x
    (sp.expand(softplus(z) * (sigmoid(x) - b)), {x: 40.0, b: 1 - 2.0**-53, z: 0.5}),
    (sp.expand(softplus(z) * (sigmoid(x) - b)), {x: 40.0, b: 1 - 2.0**-53, z: 30.0}),
]


@pytest.mark.parametrize("expr, point", SPLIT_EXAMPLES)
def test_splits_remove_cancellation_between_terms(expr, point):
    symbols = sorted(point, key=str)
    args = [point[s] for s in symbols]
    truth = evaluate(sp.lambdify(symbols, expr, modules=MODULES), args)
    stable = split_cancellations(stabilise(expr))
    naive = sp.lambdify(symbols, stabilise(expr), modules=FLOAT_MODULES)(*args)
    value = sp.lambdify(symbols, stable, modules=FLOAT_MODULES)(*args)
    assert relative_error(value, truth) <= 1e-14, (stable, value, truth)
    with mpmath.workdps(60):  # and the split form is the same function elsewhere
        for a in (0.3, -2.5, 7.0):
            at = [mpmath.mpf(a if s is x else point[s]) for s in symbols]
            f, g = (sp.lambdify(symbols, e, modules=MODULES) for e in (expr, stable))
            assert abs(f(*at) - g(*at)) <= mpmath.mpf(10) ** -45 * (1 + abs(f(*at)))


def test_the_issue_example_fails_without_splits():
    expr, point = SPLIT_EXAMPLES[0]
    naive = sp.lambdify([b, x], stabilise(expr), modules=FLOAT_MODULES)(point[b], point[x])
    assert naive == 0.0  # every digit of 4.2e-18 lost: what the splits are for


def test_a_branch_whose_big_parts_keep_one_sign_is_dropped_in_the_output_sum():
    """(1 - b) softplus(x) + b softplus(-x), b in [0, 1]: for |x| <= 1 the big parts
    (1 - b)(log 2 + x/2) and b (log 2 - x/2) are both >= 0, so the middle branch (logcosh, an
    extra log1p per element in a vectorised kernel) gains nothing there; without [0, 1] known
    for b, or inside a product (where the sum may meet terms further up), the branch stays."""
    loss = (1 - b) * softplus(x) + b * softplus(-x)
    with unit_interval([b]):
        stable = split_cancellations(stabilise(loss))
        nested = split_cancellations(stabilise(sp.cos(z) * ((1 - b) * sigmoid(x) + b * sigmoid(-x))))
    assert not stable.has(logcosh) and nested.has(sp.tanh)
    assert split_cancellations(stabilise(loss)).has(logcosh)  # b's sign unknown: split
    # a function's own range counts (stabilise.FUNCTION_RANGES), and so does the interval of an
    # argument split on the way (x > 1, then z): the GAN discriminator's loss needs no branch
    gan = softplus(-x) + softplus(z)
    assert split_cancellations(stabilise(gan)) == gan
    f, g = (sp.lambdify([b, x], e, modules=m) for e, m in ((loss, MODULES), (stable, FLOAT_MODULES)))
    for at_b in (0.0, 1e-300, 0.3, 0.5, 1 - 2.0**-53, 1.0):
        for at_x in (0.0, 1e-300, -1e-8, 0.3, -0.7, 1.0, -1.0, 1.5, 40.0, -40.0, 745.0, -745.0):
            assert relative_error(g(at_b, at_x), evaluate(f, [at_b, at_x])) <= 1e-15, (at_b, at_x)


# --- asymptotic inversion -------------------------------------------------------------------

def test_inversion_removes_overflow_of_squares():
    r = sp.Symbol("r", real=True)
    delta = sp.Symbol("delta", positive=True)
    gradient = 2 * r / (1 + r**2 / delta**2)             # Cauchy's gradient: r**2 overflows at 1e155
    inverted, where = invert_for_huge(gradient, r, r)
    assert where == sp.true  # no log taken apart: valid for every |r| > HUGE
    value = sp.lambdify([r, delta], inverted, modules=FLOAT_MODULES)(1e300, 2.0)
    assert math.isclose(value, 8e-300, rel_tol=1e-14)
    loss = delta**2 * sp.log(1 + r**2 / delta**2)
    value = sp.lambdify([r, delta], invert_for_huge(loss, r, r)[0], modules=FLOAT_MODULES)(1e300, 2.0)  # (expr, where)[0]
    truth = evaluate(sp.lambdify([r, delta], loss, modules=MODULES), [1e300, 2.0])
    assert relative_error(value, truth) <= 1e-14


def test_inversion_is_refused_where_the_value_itself_overflows():
    r = sp.Symbol("r", real=True)
    assert invert_for_huge(r**2, r, r) is None
    assert invert_for_huge(sp.log(1 + r) ** 2, r, r) is None  # no power of a polynomial: no risk
    assert HUGE > 1e10


def test_expm1_rule_takes_a_symbolic_coefficient():
    expr = z * sp.exp(x**2) - z
    assert stabilise(expr) == z * expm1(x**2)


@pytest.mark.parametrize("at", [0.0, 1e-300, -2e-310, 0.5, -3.0, 700.0, 705.0, 716.0, 1e300, -1e300])
def test_exprel_helper_matches_the_truth(at):
    exprel = FLOAT_MODULES[0]["exprel"]
    truth = evaluate(lambda v: MPMATH_IMPLEMENTATIONS["exprel"](v), [at])
    if abs(truth) > 1.7976931348623157e308:
        assert exprel(at) == math.inf
    else:
        assert relative_error(exprel(at), truth) <= 1e-14


@pytest.mark.parametrize("at", [0.0, 1e-320, -1e-310, 1e-8, 0.5, -0.5, 1.0, -1.0 + 1e-12, 1e10, 1e300])
def test_log1prel_helper_matches_the_truth(at):
    log1prel = FLOAT_MODULES[0]["log1prel"]
    truth = evaluate(lambda v: MPMATH_IMPLEMENTATIONS["log1prel"](v), [at])
    assert relative_error(log1prel(at), truth) <= 1e-14


def test_hypot_helper_is_within_one_and_a_quarter_ulp():
    """_hypot's fast path sqrt(fma(a, a, b*b)) and its libm fallback, against mpmath: random pairs
    over 600 decades (both signs), the fast path's edges 1e-135 and 1e135, subnormals, zeros, inf
    and nan."""
    hypot = FLOAT_MODULES[0]["hypot"]
    rng = np.random.default_rng(3)
    pairs = list(zip(rng.choice([-1, 1], 3000) * 10 ** rng.uniform(-300, 300, 3000),
                     rng.choice([-1, 1], 3000) * 10 ** rng.uniform(-300, 300, 3000)))
    pairs += list(zip(rng.normal(size=1000), rng.normal(size=1000)))
    edges = [0.0, 5e-324, 1e-310, 1e-200, 1e-135, 1.0000000000000002e-135, 1e-100, 1.0, 3.0, 1e100,
             1e135, 1.0000000000000002e135, 1e200, 1.7976931348623157e308]
    pairs += [(a, b) for a in edges for b in edges] + [(-a, b) for a in edges for b in edges]
    worst = 0.0
    for a, b in pairs:
        truth = mpmath.hypot(mpmath.mpf(float(a)), mpmath.mpf(float(b)))
        if truth > 1.7976931348623157e308:
            assert hypot(a, b) == math.inf
        elif truth != 0:
            worst = max(worst, relative_error(hypot(float(a), float(b)), truth))
        else:
            assert hypot(a, b) == 0.0
    assert worst <= 1.25 * 2.0**-52, worst
    assert hypot(math.inf, math.nan) == math.inf and hypot(math.nan, -math.inf) == math.inf
    assert math.isnan(hypot(math.nan, 1.0)) and math.isnan(hypot(1.0, math.nan))


@pytest.mark.parametrize("at", [0.0, 5e-324, -1e-300, 1e-8, 0.5, -3.0, 20.0, -20.000000000000004, 354.0,
                                700.0, 709.7, -709.8, 710.4, 710.5, 1e300])
def test_cosh_helper_matches_the_truth(at):
    """_cosh_from(x, expm1(|x|)): its three forms (near 0, beyond |x| = 20, where 1 + expm1
    overflows before cosh does) against mpmath, and inf where cosh overflows."""
    cosh_from = FLOAT_MODULES[0]["cosh_from"]
    m = math.expm1(abs(at)) if abs(at) < 709.79 else math.inf
    truth = mpmath.cosh(mpmath.mpf(at))
    if truth > 1.7976931348623157e308:
        assert cosh_from(at, m) == math.inf
    else:
        assert relative_error(cosh_from(at, m), truth) <= 4e-16


def test_inversion_handles_a_symbolic_power():
    """Barron's loss and gradient at |x| = 1e300: (x/c)**2 overflows, the power of it need not."""
    r = sp.Symbol("r", real=True)
    alpha = sp.Symbol("alpha", real=True)
    c = sp.Symbol("c", positive=True)
    loss = sp.Abs(alpha - 2) / alpha * ((r**2 / (c**2 * sp.Abs(alpha - 2)) + 1) ** (alpha / 2) - 1)
    for expr in (loss, sp.diff(loss, r), sp.diff(loss, r, 2)):
        inverted, where = invert_for_huge(expr, r, r)
        for point in ([1e300, 1.0, 1.0], [-1e300, 1.0, 2.5], [1e300, 1.5, 0.5], [1e200, -3.0, 1.0], [1e300, 1e-310, 1.0],
                      [1e300, 2 + 1e-8, 1.0], [-1e300, 2 - 1e-8, 2.5]):  # exp(G) alone is 1e308/|alpha - 2|
            truth = evaluate(sp.lambdify([r, alpha, c], expr, modules=MODULES), point)
            holds = bool(sp.lambdify([r, alpha, c], where, modules=FLOAT_MODULES)(*point))
            if truth is not None and abs(truth) < 1e308 and holds:
                value = sp.lambdify([r, alpha, c], inverted, modules=FLOAT_MODULES)(*point)
                assert relative_error(value, truth) <= 1e-12, (expr, point, value, truth)
        # where |alpha - 2| >> x**2 the logs taken apart cancel: the form does not claim that point
        assert not sp.lambdify([r, alpha, c], where, modules=FLOAT_MODULES)(1e100, -1e300, 1.0)


def test_exp_product_computes_a_quotient_first():
    """exp(a)*N/D: exp(600)*z**2 overflows at z = 1e70, exp(600)*(z**2/(1 + z**2)**2) does not;
    and beyond |a| = 700, exp(a + log|N/D|)."""
    expr = sp.exp(3 * x) * z**2 / (1 + z**2) ** 2
    stable = stabilise(expr)
    for point in ([200.0, 1e70], [300.0, 1e70], [250.0, 1e-70], [0.5, 3.0]):
        truth = evaluate(sp.lambdify([x, z], expr, modules=MODULES), point)
        value = sp.lambdify([x, z], stable, modules=FLOAT_MODULES)(*point)
        assert relative_error(value, truth) <= 1e-12, (stable, point, value, truth)


def _jensen_shannon_term(a, b):
    """xlogy(a, a) - xlogy(a, m) + xlogy(b, b) - xlogy(b, m), m = (a + b)/2, of sympy symbols."""
    m = (a + b) / 2
    return xlogy(a, a) - xlogy(a, m) + xlogy(b, b) - xlogy(b, m)


@pytest.mark.parametrize("a, b", [(0.13050471177614809, 0.12755822648228032), (0.3, 0.3 + 2**-50), (1.0, 0.5),
                                  (0.5, 0.25), (1.0, 0.0), (0.0, 1e-300), (1e-300, 1.0), (1e-16, 1e-300),
                                  (1.0, 1.0 - 2**-52), (1e-300, 3e-300), (0.7, 0.2), (0.0, 0.0)])
def test_mixture_entropy_keeps_its_digits_on_every_branch(a, b):
    """The near form (|t| < 1/2), the far form and a = b = 0, against the four terms in mpmath;
    with the coefficient 1/2 of the Jensen-Shannon divergence."""
    p, q = sp.symbols("p q", nonnegative=True)  # probabilities: p + q = 0 is possible
    expr = _jensen_shannon_term(p, q) / 2
    stable = stabilise(expr)
    assert stable.has(sp.atanh)
    truth = evaluate(sp.lambdify([p, q], expr, modules=MODULES), [a, b])
    value = sp.lambdify([p, q], stable, modules=FLOAT_MODULES)(a, b)
    assert relative_error(value, truth) <= 1e-14, (a, b, value, truth)
    naive = sp.lambdify([p, q], expr, modules=FLOAT_MODULES)(a, b)
    if (a, b) == (0.13050471177614809, 0.12755822648228032):
        assert relative_error(naive, truth) > 1e-13  # the four terms cancel: what the rule is for


def test_mixture_entropy_needs_the_mean_and_nonnegative_arguments():
    other = xlogy(y, y) - xlogy(y, (y + w) / 3) + xlogy(w, w) - xlogy(w, (y + w) / 3)
    assert not stabilise(other).has(sp.atanh)
    assert not stabilise(_jensen_shannon_term(x, w)).has(sp.atanh)  # x may be negative


def test_divide_in_turn_divides_by_the_bounded_quotient_first():
    """p/(2 q (p + q)), the Jensen-Shannon Hessian: (p/(p + q))/(2 q), so p = 0 gives 0, not 0/0."""
    expr = y / (2 * w * (y + w))
    stable = stabilise(expr)
    f = sp.lambdify([y, w], stable, modules=FLOAT_MODULES)
    assert f(0.0, 1e-300) == 0.0
    for a, b in ((1e-16, 1e-300), (1e-300, 1e-300), (1.0, 1e-300), (0.5, 0.25)):
        truth = evaluate(sp.lambdify([y, w], expr, modules=MODULES), [a, b])
        assert relative_error(f(a, b), truth) <= 1e-15, (a, b)
    assert stabilise(1 / (y * w)) == 1 / (y * w)  # no numerator: nothing to order


def test_exp_product_joins_two_exponentials_and_a_quotient():
    """exp(a)*exp(c)*N/D (a softmax exp(u) times (1 - softmax)**gamma = exp(gamma log1p(-exp(u)))):
    at a = -740, exp(a) is subnormal with a few bits left, which N/D = 1e20 exposes;
    exp(a + c + log|N/D|) keeps them."""
    expr = sp.exp(x) * sp.exp(z) * b**2 / (1 + z**2)
    stable = stabilise(expr)
    for point in ([-740.0, 0.5, 1e10], [-745.0, -0.25, -3e12], [2.0, 0.5, 3.0]):
        truth = evaluate(sp.lambdify([x, z, b], expr, modules=MODULES), point)
        value = sp.lambdify([x, z, b], stable, modules=FLOAT_MODULES)(*point)
        assert relative_error(value, truth) <= 1e-12, (stable, point, value, truth)
    naive = sp.lambdify([x, z, b], expr, modules="math")(-740.0, 0.5, 1e10)
    assert relative_error(naive, evaluate(sp.lambdify([x, z, b], expr, modules=MODULES), [-740.0, 0.5, 1e10])) > 1e-6


def test_distribute_to_cancel_reaches_a_quotient_inside_a_product_inside_the_sum():
    """The focal loss's gradient at gamma = 2, as SymPy differentiates Q**2: the quotient by
    sigmoid(-x) sits in a sum that is a factor of a term, (y*sigmoid(x)/sigmoid(-x) - w)*Q, not a
    term itself; at x = 745, sigmoid(-x) is subnormal and the quotient is inf."""
    q = w * sigmoid(-x) + y * sigmoid(x)
    expr = sigmoid(-x) * (z * sigmoid(x) * softplus(x) + (y * sigmoid(x) / sigmoid(-x) - w) * q)
    rule = next(r for r in RULES if r.name == "distribute_to_cancel")
    rewritten = stabilise(expr, (rule,))
    assert not any(isinstance(e, sp.Pow) and e.exp.is_negative for e in sp.preorder_traversal(rewritten)), rewritten
    point = {x: 745.0, y: 0.75, w: 1e-300, z: 2.0}
    symbols = sorted(point, key=str)
    args = [point[s] for s in symbols]
    truth = evaluate(sp.lambdify(symbols, expr, modules=MODULES), args)
    assert abs(truth - 0.75**2) < 1e-300  # y*sigmoid(x)*q, rounded to 50 digits
    naive = sp.lambdify(symbols, expr, modules=FLOAT_MODULES)(*args)
    assert not math.isfinite(naive)
    value = sp.lambdify(symbols, stabilise(expr), modules=FLOAT_MODULES)(*args)
    assert relative_error(value, truth) <= 1e-15, (stabilise(expr), value, truth)
    # a negative power of sigmoid(-x) does not cancel the quotient: nothing to distribute
    assert stabilise(expr / sigmoid(-x) ** 2, (rule,)) == expr / sigmoid(-x) ** 2


def test_complement_weights_combine_powers_of_one_minus_the_weight():
    """A row's log-weight u = log p <= 0 with (1 - exp(u))**g/(1 - exp(u)) (the focal loss's
    derivative): in Q = -expm1(u) the powers combine, so at u = 0 (C = 1) the value is the limit,
    0, not 0/0; where p is close to 1, the difference f - f exp(u) keeps its digits."""
    from lossgen.stabilise_rows import _complement_weights
    from lossgen.stabilise import direct_form
    u = sp.Symbol("u", nonpositive=True)
    g = sp.Symbol("g", nonnegative=True)
    q = 1 - sp.exp(u)
    expr = q**g * (g * u * sp.exp(u) / q - 1) * (1 - sp.exp(u))  # f'(u) (1 - p)
    stable = direct_form(_complement_weights(expr, u))
    rewritten = sp.lambdify([u, g], stable, modules=FLOAT_MODULES)
    assert rewritten(0.0, 2.0) == 0.0
    with pytest.raises(ZeroDivisionError):  # the original: 0/0 at u = 0
        sp.lambdify([u, g], expr, modules="math")(0.0, 2.0)
    for point in ([-1e-20, 2.0], [-3e-9, 2.0], [-0.3, 0.5], [-5.0, 2.0], [-800.0, 3.0]):
        truth = evaluate(sp.lambdify([u, g], expr, modules=MODULES), point)
        assert relative_error(rewritten(*point), truth) <= 1e-13, (point, rewritten(*point), truth)
    # u (1 - exp(u))**(g - 1) is -V Q**g with V = u/expm1(u): at g < 1 finite where Q = 0
    expr = g * u * sp.exp(u) * (1 - sp.exp(u)) ** (g - 1)
    rewritten = sp.lambdify([u, g], direct_form(_complement_weights(expr, u)), modules=FLOAT_MODULES)
    assert rewritten(0.0, 0.5) == 0.0 and rewritten(0.0, 0.0) == 0.0
    for point in ([-1e-300, 0.5], [-1e-9, 0.25], [-0.5, 0.5], [-3.0, 0.5]):
        truth = evaluate(sp.lambdify([u, g], expr, modules=MODULES), point)
        assert relative_error(rewritten(*point), truth) <= 1e-13, (point, rewritten(*point), truth)


def test_simplex_weights_write_a_polynomial_that_vanishes_at_a_vertex_homogeneous():
    """Two softmax weights of a row, E = p_k and F = p_y (k != y), and the rest O = 1 - E - F: a
    polynomial in E and F that vanishes where E = 1 (Poly-1's Hessian diagonal,
    p_k ((1 - p_k)(w_y + eps p_y) - eps p_y p_k)) is written homogeneous in (E, F, O), equal to it on
    the simplex, with no constant left to cancel. Where a class may tie with this one
    (|1 - 2 E| < 1/2) it is collected by the parameters, with its factor F + O - E = 1 - 2 E as D
    (tie_difference); elsewhere by monomial, so that w_y - eps is one coefficient. At the element y
    itself (onehot(y) = 1), where the polynomial is in E alone, it is written homogeneous in (E, Q),
    Q = 1 - E, because that gives a factor Q - E = D; a polynomial that neither vanishes at a vertex
    nor gives a D (the gradient, (w_y + eps p_y) p_k) is left as it was."""
    from conftest import ROW_PATHS
    from lossgen.derive_rows import derive_rows
    from lossgen.spec import load_spec
    from lossgen.stabilise_rows import _at_index, _log_weights, _simplex_weights
    derivation = derive_rows(load_spec(ROW_PATHS["poly1_cross_entropy"]))
    ((x, u, x_of_u, back, r),) = _log_weights(derivation)
    w, eps = (derivation.spec.symbols[n] for n in ("w", "epsilon"))

    def in_u(expr):
        return sp.factor_terms(_at_index(expr, derivation).subs(x, x_of_u))

    hess = in_u(derivation.hess[0])
    out, placeholders = _simplex_weights(hess, u, back, r, derivation)
    (at_y, _), (elsewhere, _) = out.args
    d, e, f, o, q = sorted(placeholders, key=lambda s: s.name)
    assert [s.name[:2] for s in (d, e, f, o, q)] == ["_D", "_E", "_F", "_O", "_Q"]
    weights = {placeholders[e]: e, placeholders[f]: f}
    take_w = next(t.symbol for t in derivation.reductions if t.kind == "take" and t.summand == -w)  # -w_y
    for form, truth, gens, rest in ((at_y, hess.args[0][0], (e, q), {q: 1 - e}),
                                    (elsewhere, hess.args[1][0], (e, f, o), {o: 1 - e - f})):
        (weight, pieces) = sorted(form.args, key=lambda a: isinstance(a, sp.Piecewise))
        assert weight == e and isinstance(pieces, sp.Piecewise)
        (by_monomial, away), (tie_form, _) = pieces.args
        assert away == (sp.Abs(2 * e - 1) >= 0.5)
        assert d in tie_form.free_symbols and d not in by_monomial.free_symbols
        for piece in (by_monomial, tie_form):
            assert sp.Poly(sp.expand(piece), *gens, d).is_homogeneous
            assert sp.expand(e * piece.xreplace({**rest, d: 1 - 2 * e}) - truth.xreplace(weights)) == 0
        coefficients = sp.Poly(sp.expand(by_monomial), *gens).coeffs()
        assert any(sp.expand(c - (w - eps)) == 0 or sp.expand(c - (-take_w - eps)) == 0 for c in coefficients)
    grad = in_u(derivation.grad[0])
    assert _simplex_weights(grad, u, back, r, derivation) == (grad, {})


@pytest.mark.parametrize("point", [{x: -800.0, z: -0.5, b: 0.0}, {x: -800.0, z: -0.5, b: -1e-300},
                                   {x: -1e300, z: 0.0, b: 0.0}, {x: -400.0, z: -1.0, b: 1e-200}])
def test_power_log_domain_keeps_the_value_where_the_base_underflows(point):
    """Rule power_log_domain's far form (taken where the base is below 1e-100) against the
    original expression in mpmath, where float64's sigmoid(x)**(z - 1) is inf and its product
    with the vanishing factors nan (or 0 where the product is normal)."""
    expr, _ = EXAMPLES["power_log_domain"]
    rewritten = stabilise(expr, tuple(r for r in RULES if r.name == "power_log_domain"))
    symbols = sorted(point, key=str)
    args = [point[s] for s in symbols]
    truth = evaluate(sp.lambdify(symbols, expr, modules=MODULES), args, digits=60)
    # log(0) is -inf in the kernels (Numba's error model "numpy"), where Python's math raises
    log = {"log": lambda v: -math.inf if v == 0 else math.log(v)}
    value = sp.lambdify(symbols, rewritten, modules=[log, *FLOAT_MODULES])(*args)
    assert relative_error(value, truth) <= 1e-12, (value, truth)


def test_parameter_first_keeps_a_zero_or_tiny_parameter_times_an_overflowing_power():
    """Rule parameter_first (LAST_RULES): lambda2*w**2 at lambda2 = 0 is 0*inf = nan for
    |w| > 1.3e154 and inf at lambda2 = 1e-300, w = 1e200 (the truth 1e100); alpha*y/p**2 at
    alpha = 0, p = 1e-300 likewise (combo's Hessian). The fallback takes the coefficient first
    and the factors in turn; where the product is finite it is the product as before."""
    lam, alpha, beta = (sp.Symbol(n, nonnegative=True) for n in ("lambda2", "alpha", "beta"))
    rule = next(r for r in LAST_RULES if r.name == "parameter_first")
    assert rule.reason and rule.find and rule.replace
    cases = [(lam * x**2, [(0.0, 1e300), (1e-300, 1e200), (2.5, -3.0), (0.0, 0.0)], (lam, x)),
             (alpha * (y * beta / p**2 + (1 - y) / (1 - p)**2) / 3,
              [(0.0, 1.0, 0.5, 1e-300), (1e-300, 1.0, 0.5, 1e-300), (0.5, 0.3, 0.25, 0.7)], (alpha, y, beta, p))]
    for expr, points, symbols in cases:
        with unit_interval((alpha, beta, p)), parameters_at_zero((lam, alpha, beta)):
            rewritten = apply_last(expr)
        assert rewritten.has(finite_or), f"rule parameter_first did not fire on {expr}"
        truth = sp.lambdify(symbols, expr, modules=MODULES)
        computed = sp.lambdify(symbols, rewritten, modules=FLOAT_MODULES)
        raw = sp.lambdify(symbols, expr, modules="numpy")
        for point in points:
            with mpmath.workdps(60):
                exact = truth(*[mpmath.mpf(v) for v in point])
            with np.errstate(all="ignore"):  # float64 as the kernels: x**2 is inf, not an OverflowError
                value, before = (float(f(*map(np.float64, point))) for f in (computed, raw))
            assert relative_error(value, exact) <= 1e-15, (expr, point)
            if point[0] <= 1e-300 and point[-1] in (1e300, 1e200, 1e-300):
                assert not math.isfinite(before), (expr, point)  # the gap that the rule closes


def test_parameter_first_leaves_bounded_and_single_powers_alone():
    """sigmoid(x)**2 and (1 - 2*y)**2 (y in [0, 1]) cannot overflow, y/p divides once: no fallback."""
    lam = sp.Symbol("lambda2", nonnegative=True)
    with unit_interval((p,)), parameters_at_zero((lam,)):
        for expr in (lam * sigmoid(x)**2, lam * (1 - 2 * p)**2, lam * y / p, lam * x):
            assert apply_last(expr) == expr
