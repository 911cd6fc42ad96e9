"""The rewrite rules: each fires on its pattern, keeps the exact value (checked with mpmath
at 60 digits), and where its replacement is made of `math` functions, is more accurate in
float64 than the original at the point that motivates it."""
import math
import types

import mpmath
import numba
import pytest
import sympy as sp

from lossgen.emit import HELPERS, template_environment
from lossgen.stabilise import RULES, stabilise
from lossgen.vocabulary import MPMATH_IMPLEMENTATIONS, sigmoid

x = sp.Symbol("x", real=True)
y = sp.Symbol("y", positive=True)

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
}

MODULES = [MPMATH_IMPLEMENTATIONS, "mpmath"]


def _kernel_helpers():
    """The stable helpers exactly as generated modules define them (from the template)."""
    source = template_environment().get_template("numba_helpers.py.j2").render(helpers=set(HELPERS.values()))
    uncached = types.SimpleNamespace(njit=lambda **options: numba.njit(**{**options, "cache": False}))
    namespace = {"math": math, "numba": uncached}
    exec(compile(source, "numba_helpers.py.j2", "exec"), namespace)  # our own template, not spec data
    return {name: namespace[f"_{helper}"] for name, helper in HELPERS.items()}


FLOAT_MODULES = [_kernel_helpers(), "math"]


def test_every_rule_has_an_example_and_a_reason():
    assert sorted(EXAMPLES) == sorted(rule.name for rule in RULES)
    for rule in RULES:
        assert rule.reason and rule.find and rule.replace


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_rule_fires_and_keeps_the_exact_value(name):
    rule = next(r for r in RULES if r.name == name)
    expr, point = EXAMPLES[name]
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
    rewritten = stabilise(expr)
    symbols = sorted(point, key=str)
    args = [point[s] for s in symbols]
    with mpmath.workdps(80):
        truth = sp.lambdify(symbols, expr, modules=MODULES)(*[mpmath.mpf(a) for a in args])
    value = sp.lambdify(symbols, rewritten, modules=FLOAT_MODULES)(*args)
    assert math.isclose(value, float(truth), rel_tol=1e-14, abs_tol=0.0), (rewritten, value, truth)


def test_rules_apply_inside_larger_expressions_until_nothing_changes():
    expr = 3 * sp.log(1 + sp.exp(x) - 1) + (sp.sqrt(1 + x**2) - 1) * y
    stable = stabilise(expr)
    assert stabilise(stable) == stable
    assert not stable.has(sp.log) and not stable.has(sp.exp)
