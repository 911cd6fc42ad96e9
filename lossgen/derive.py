"""Stage 2, derive: gradient and Hessian of a loss with respect to its predictions.

Derivatives are the almost-everywhere ones: DiracDelta terms (from differentiating Abs,
sign, Heaviside, Max, Min) are dropped. At a kink the kernels use one convention, SymPy's:

* ``sign(0) = 0``, so d|x|/dx = 0 at x = 0 (as PyTorch's autograd for ``abs`` and ``l1_loss``);
* ``Heaviside(0) = 1/2``, so d Max(a, b) = 1/2 (a' + b') at a tie (as ``torch.maximum``);
* ``Piecewise`` differentiates branch by branch; on a boundary the first branch whose
  condition holds, as written in the spec, gives the derivative.

Simplification is bounded: each derivative is tidied by ``together``, ``factor_terms`` and
expanding the numerator (cheap, polynomial-time), and the smallest result is kept; there is
no open-ended ``simplify``.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import sympy as sp

from .spec import LossSpec

# Which derived quantities each kernel returns, in order. One entry per prediction input
# for "grad" and "hess" (in the spec's input order).
KERNELS: dict[str, tuple[str, ...]] = {
    "loss": ("loss",),
    "grad": ("grad",),
    "hess": ("hess",),
    "grad_hess": ("grad", "hess"),
    "loss_grad_hess": ("loss", "grad", "hess"),
}

TIDY_MAX_OPS = 400  # beyond this size an expression is left as SymPy built it


@dataclass(frozen=True)
class Derivation:
    """A loss and its derivatives; ``grad[k]`` and ``hess[k]`` belong to ``spec.predictions[k]``."""

    spec: LossSpec
    loss: sp.Expr
    grad: tuple[sp.Expr, ...]
    hess: tuple[sp.Expr, ...]

    def outputs(self, kernel: str) -> list[sp.Expr]:
        """The expressions a kernel computes, in return order."""
        parts = {"loss": [self.loss], "grad": list(self.grad), "hess": list(self.hess)}
        return [e for quantity in KERNELS[kernel] for e in parts[quantity]]

    def map(self, transform: Callable[[sp.Expr], sp.Expr]) -> "Derivation":
        """Apply ``transform`` to the loss and every derivative."""
        return replace(self, loss=transform(self.loss), grad=tuple(map(transform, self.grad)),
                       hess=tuple(map(transform, self.hess)))


def almost_everywhere(expr: sp.Expr) -> sp.Expr:
    """Drop DiracDelta terms: the derivative away from the measure-zero set of kinks."""
    expr = expr.replace(lambda e: isinstance(e, sp.DiracDelta), lambda e: sp.S.Zero)
    if expr.has(sp.Derivative):
        raise ValueError(f"SymPy could not differentiate part of {expr}")
    return expr


def tidy(expr: sp.Expr) -> sp.Expr:
    """Bounded simplification: the smallest of expr, together(expr), factor_terms(expr)."""
    if isinstance(expr, sp.Piecewise):
        return sp.Piecewise(*((tidy(e), c) for e, c in expr.args))
    if sp.count_ops(expr) > TIDY_MAX_OPS:
        return expr
    together = sp.together(expr)
    numerator, denominator = sp.fraction(together)
    candidates = [expr, together, sp.factor_terms(expr), sp.expand(numerator) / denominator]
    return min(candidates, key=lambda e: (sp.count_ops(e), sp.default_sort_key(e)))


def differentiate(expr: sp.Expr, symbol: sp.Symbol) -> sp.Expr:
    """d expr / d symbol, almost everywhere, tidied."""
    return tidy(almost_everywhere(sp.diff(expr, symbol)))


def derive(spec: LossSpec) -> Derivation:
    """Gradient and (diagonal) Hessian of ``spec.loss`` with respect to each prediction."""
    grads, hessians = [], []
    for prediction in spec.predictions:
        symbol = spec.symbols[prediction.name]
        gradient = differentiate(spec.loss, symbol)
        grads.append(gradient)
        hessians.append(differentiate(gradient, symbol))
    return Derivation(spec, spec.loss, tuple(grads), tuple(hessians))


def kink_expressions(derivation: Derivation) -> list[sp.Expr]:
    """Expressions that vanish where the loss or a derivative is not smooth (:func:`kinks_of`)."""
    predictions = {derivation.spec.symbols[p.name] for p in derivation.spec.predictions}
    return kinks_of([derivation.loss, *derivation.grad, *derivation.hess], predictions)


def kinks_of(exprs, variables) -> list[sp.Expr]:
    """Arguments of Abs, sign and Heaviside, differences of Max/Min arguments, and the two
    sides of every Piecewise condition in ``exprs``; only those that depend on ``variables``."""
    found = set()
    for expr in exprs:
        for node in sp.preorder_traversal(expr):
            if isinstance(node, (sp.Abs, sp.sign, sp.Heaviside)):
                found.add(node.args[0])
            elif isinstance(node, (sp.Max, sp.Min)):
                args = sorted(node.args, key=sp.default_sort_key)
                found.update(a - b for i, a in enumerate(args) for b in args[i + 1:])
            elif isinstance(node, sp.core.relational.Relational):
                found.add(node.lhs - node.rhs)
    # k and -k vanish at the same points: keep one of them
    found = {sp.factor_terms(sp.expand(k)) for k in found}
    found = {-k if k.could_extract_minus_sign() else k for k in found}
    return sorted((k for k in found if k.free_symbols & set(variables)), key=sp.default_sort_key)
