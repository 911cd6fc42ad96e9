"""Stage 3, stabilise: rewrite expressions into forms that floating point evaluates accurately.

``RULES`` is the only place where numerical-stability knowledge lives. Each rule is a
rewrite ``find -> replace`` that holds exactly in real arithmetic, with the reason it helps
in float64. Rules are applied bottom-up, in table order, until nothing changes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import sympy as sp
from sympy.codegen.cfunctions import expm1, hypot, log1p
from sympy.core.traversal import bottom_up

from .vocabulary import logcosh, sigmoid, softplus

Rewrite = Callable[[sp.Expr], Optional[sp.Expr]]  # the replacement, or None when no match


@dataclass(frozen=True)
class Rule:
    name: str
    find: str       # the pattern, as a reader would write it
    replace: str
    reason: str
    rewrite: Rewrite


def _add_terms(expr):
    return list(expr.args) if isinstance(expr, sp.Add) else None


def _log_one_plus(e):
    if isinstance(e, sp.log) and isinstance(e.args[0], sp.Add) and sp.S.One in e.args[0].args:
        return log1p(e.args[0] - 1)


def _exp_minus_one(e):
    """c*exp(x) - c -> c*expm1(x), for a number c (so 1 - exp(-x) -> -expm1(-x))."""
    terms = _add_terms(e)
    if terms:
        for t in terms:
            c, rest = t.as_coeff_Mul()
            if isinstance(rest, sp.exp) and -c in terms:
                others = [u for u in terms if u is not t and u != -c]
                return sp.Add(c * expm1(rest.args[0]), *others)


def _log_cosh(e):
    if isinstance(e, sp.log) and isinstance(e.args[0], sp.cosh):
        return logcosh(e.args[0].args[0])


def _sinh_over_cosh(e):
    if isinstance(e, sp.Mul):
        powers = e.as_powers_dict()
        for base, k in powers.items():
            if isinstance(base, sp.sinh) and powers.get(sp.cosh(base.args[0])) == -k:
                others = [b ** j for b, j in powers.items() if b not in (base, sp.cosh(base.args[0]))]
                return sp.Mul(sp.tanh(base.args[0]) ** k, *others)


def _cosh2_minus_sinh2(e):
    terms = _add_terms(e)
    if terms:
        for t in terms:
            if isinstance(t, sp.Pow) and isinstance(t.base, sp.cosh) and t.exp == 2:
                partner = -sp.sinh(t.base.args[0]) ** 2
                if partner in terms:
                    rest = [u for u in terms if u is not t and u != partner]
                    return sp.Add(sp.S.One, *rest)


def _one_minus_tanh2(e):
    terms = _add_terms(e)
    if terms and sp.S.One in terms:
        for t in terms:
            if (isinstance(t, sp.Mul) and len(t.args) == 2 and t.args[0] == -1
                    and isinstance(t.args[1], sp.Pow) and isinstance(t.args[1].base, sp.tanh)
                    and t.args[1].exp == 2):
                rest = [u for u in terms if u is not t and u != sp.S.One]
                return sp.Add(sp.cosh(t.args[1].base.args[0]) ** -2, *rest)


def _sum_of_two_squares(base):
    """(x, y) when base is x**2 + y**2 (or c**2 x**2 + y**2 with a constant c), else None."""
    terms = _add_terms(base)
    if not terms or len(terms) != 2:
        return None
    roots = []
    for t in terms:
        root = sp.sqrt(t)
        if not (t.is_nonnegative and isinstance(t, (sp.Pow, sp.Mul)) and not isinstance(root, sp.Pow)):
            return None
        roots.append(root)
    return roots


def _hypot(e):
    if isinstance(e, sp.Pow) and e.exp.is_Rational and e.exp.q == 2:
        roots = _sum_of_two_squares(e.base)
        if roots:
            return hypot(*roots) ** (e.exp * 2)


def _sqrt_one_plus_minus_one(e):
    terms = _add_terms(e)
    if terms and sp.S.NegativeOne in terms:
        for t in terms:
            if (isinstance(t, sp.Pow) and t.exp == sp.S.Half and isinstance(t.base, sp.Add)
                    and sp.S.One in t.base.args):
                u = t.base - 1
                rest = [v for v in terms if v is not t and v != sp.S.NegativeOne]
                return sp.Add(u / (t + 1), *rest)


def _one_minus_sigmoid(e):
    terms = _add_terms(e)
    if terms and sp.S.One in terms:
        for t in terms:
            if isinstance(t, sp.Mul) and t.args[0] == -1 and len(t.args) == 2 and isinstance(t.args[1], sigmoid):
                rest = [u for u in terms if u is not t and u != sp.S.One]
                return sp.Add(sigmoid(-t.args[1].args[0]), *rest)


def _log_one_plus_exp(e):
    if isinstance(e, log1p) and isinstance(e.args[0], sp.exp):
        return softplus(e.args[0].args[0])
    if isinstance(e, sp.log) and isinstance(e.args[0], sp.Add) and len(e.args[0].args) == 2 \
            and sp.S.One in e.args[0].args:
        other = e.args[0] - 1
        if isinstance(other, sp.exp):
            return softplus(other.args[0])


RULES: tuple[Rule, ...] = (
    Rule("softplus", "log(1 + exp(x))", "softplus(x)", "exp overflows for x > 709", _log_one_plus_exp),
    Rule("log1p", "log(1 + x)", "log1p(x)", "1 + x drops the digits of a small x", _log_one_plus),
    Rule("expm1", "c*exp(x) - c", "c*expm1(x)", "cancels to 0 for small x", _exp_minus_one),
    Rule("logcosh", "log(cosh(x))", "logcosh(x)", "cosh overflows for |x| > 710; log(1 + tiny) cancels", _log_cosh),
    Rule("tanh", "sinh(x)**k/cosh(x)**k", "tanh(x)**k", "sinh and cosh overflow for |x| > 710, their ratio does not", _sinh_over_cosh),
    Rule("pythagoras", "cosh(x)**2 - sinh(x)**2", "1", "two huge nearly equal terms cancel", _cosh2_minus_sinh2),
    Rule("sech2", "1 - tanh(x)**2", "cosh(x)**-2", "tanh(x) rounds to 1 for |x| > 19", _one_minus_tanh2),
    Rule("hypot", "(x**2 + y**2)**(k/2)", "hypot(x, y)**k", "x**2 overflows for |x| > 1.3e154", _hypot),
    Rule("sqrt1pm1", "sqrt(1 + u) - 1", "u/(sqrt(1 + u) + 1)", "cancels to 0 for small u", _sqrt_one_plus_minus_one),
    Rule("sigmoid_complement", "1 - sigmoid(x)", "sigmoid(-x)", "sigmoid(x) rounds to 1 for x > 37", _one_minus_sigmoid),
)

MAX_PASSES = 8


def stabilise(expr: sp.Expr, rules: tuple[Rule, ...] = RULES) -> sp.Expr:
    """Apply ``rules`` bottom-up until the expression stops changing."""
    for _ in range(MAX_PASSES):
        before = expr
        for rule in rules:
            expr = bottom_up(expr, lambda e, rewrite=rule.rewrite: _or_same(rewrite, e))
        if expr == before:
            break
    return expr


def _or_same(rewrite: Rewrite, e):
    replacement = rewrite(e) if isinstance(e, sp.Basic) else None
    return e if replacement is None else replacement
