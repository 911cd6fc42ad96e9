"""Stage 2 for row-wise losses: lower the reductions into a row program, and differentiate it.

A row-wise loss maps rows x in R^C (C known only at run time) to one number. Lowering
replaces each reduction by a row value, innermost first:

    R_a = reduce_k g_a(x_k, R_b, ...)   (reduce: sum, max, min, logsumexp or take)
    loss = F(R_1, ..., R_m)

so every expression SymPy sees is scalar: an *element expression* in the symbols of one
element (x_k) and row values, or a *row expression* in row values alone. With a weight
w_a(k) = d R_a / d g_a(k) per kind (1 for sum; exp(g_k - R_a) for logsumexp; onehot of the
index for take, and of the arg-max for max and min), the chain rule gives

    d R_a / d x_j = w_a(j) dg_a/dx (j) + sum_b [sum_k w_a(k) dg_a/dR_b (k)] d R_b / d x_j,

where each bracket is one more reduction. The gradient G(j) = sum_a dF/dR_a dR_a/dx_j is an
element expression; differentiating it once more gives the Hessian as a diagonal plus a sum
of outer products (Griewank and Walther, Evaluating Derivatives, 2008, ch. 3 and 5):

    H[j, l] = delta_jl D(j) + sum_r P_r(j) Q_r(l),   D = dG/dx (j), P_r = dG/dR_r, Q_r = dR_r/dx_l,

so the diagonal (D + sum_r P_r Q_r, stabilised as one expression), every (C, C) block and
the Hessian-vector product (entry by entry, never stored) come from element expressions and
row values alone. Several prediction inputs give the cross blocks alike.

Before it is differentiated, the lowered loss goes through :mod:`lossgen.fuse_rows`: row
values that are close (the numerator and the denominator of Dice) are subtracted exactly and
their difference computed as one fused sum, so the derivatives follow the accurate program.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import sympy as sp

from .derive import almost_everywhere, tidy
from .domains import DOMAINS
from .fuse_rows import expand_shares, fuse_row_cancellations, hessian_forms
from .reductions import ROW_SIZE, logsumexp, onehot, rowmax, rowmin, rowsum, take
from .spec import LossSpec

KIND_OF = {rowsum: "sum", rowmax: "max", rowmin: "min", logsumexp: "logsumexp", take: "take"}

# Row-wise kernels and what they compute (the runtime's methods map onto them).
ROW_KERNELS: dict[str, tuple[str, ...]] = {
    "loss": ("loss",),
    "grad": ("grad",),
    "hess": ("hess",),
    "grad_hess": ("grad", "hess"),
    "loss_grad_hess": ("loss", "grad", "hess"),
}
# and from the Hessian blocks: "hvp" (Hessian times v) and "hess_full" (every block)


@dataclass(frozen=True)
class Reduction:
    """R = reduce_k summand(k), one value per row."""

    symbol: sp.Symbol
    kind: str                      # sum, max, min, logsumexp, take
    summand: sp.Expr               # an element expression (may use earlier reductions)
    index: sp.Expr | None = None   # take: the class index; max/min: the arg-max symbol they set


@dataclass(frozen=True)
class HessianBlock:
    """d2 loss / d x_j d x'_l = delta_jl diagonal(j) + sum over (P, Q) of P(j) Q(l)."""

    diagonal: sp.Expr
    outer: tuple[tuple[sp.Expr, sp.Expr], ...]


@dataclass(frozen=True)
class RowDerivation:
    """A row-wise loss lowered and differentiated; per-prediction tuples follow spec.predictions."""

    spec: LossSpec
    reductions: tuple[Reduction, ...]
    loss: sp.Expr                          # a row expression
    grad: tuple[sp.Expr, ...]              # element expressions
    hess: tuple[sp.Expr, ...]              # the Hessian's diagonal, element expressions
    blocks: dict                           # (i, j) -> HessianBlock, for predictions i and j
    element_symbols: frozenset             # axis inputs and directions: one element of a row
    directions: tuple[sp.Symbol, ...]      # v, one per prediction (hvp)
    # (i, j), i != j: the diagonal entries of block (i, j), D + sum P Q as one expression (as
    # hess for i = j), so that its terms cancel before rounding (a norm's I - w w^T at C = 1)
    cross: dict = field(default_factory=dict)
    # the norms computed in a binary scale where their squares leave the safe range
    # (stabilise_rows.scaled_norms): ScaledNorm entries, read by the emitter
    scaled: tuple = ()
    # sums of products whose error parts also carry each product's rounding error (a fused
    # multiply-add; stabilise_rows.product_errors): reduction symbol -> the product's two factors
    products: dict = field(default_factory=dict)
    # sums whose terms may cancel, evaluated exactly where they do (stabilise_rows.exact_sums):
    # reduction symbol -> its summand's monomials ((integer, factors), ...)
    exact: dict = field(default_factory=dict)

    def map(self, transform) -> "RowDerivation":
        """Apply ``transform`` to every expression (summands, loss, derivatives)."""
        return replace(
            self,
            reductions=tuple(replace(r, summand=transform(r.summand)) for r in self.reductions),
            loss=transform(self.loss), grad=tuple(map(transform, self.grad)),
            hess=tuple(map(transform, self.hess)),
            blocks={k: HessianBlock(transform(b.diagonal), tuple((transform(p), transform(q)) for p, q in b.outer))
                    for k, b in self.blocks.items()},
            cross={k: transform(e) for k, e in self.cross.items()})


def _d(expr: sp.Expr, symbol: sp.Symbol) -> sp.Expr:
    return tidy(almost_everywhere(sp.diff(expr, symbol)))


def varies_along_row(expr: sp.Expr, element_symbols) -> bool:
    """Does ``expr`` vary along the row (an axis input, a direction, or onehot)?"""
    return bool(expr.free_symbols & element_symbols) or expr.has(onehot)


class RowProgram:
    """The reductions of one loss, interned: an identical reduction is computed once."""

    def __init__(self, element_symbols):
        self.element_symbols = frozenset(element_symbols)
        self.reductions: dict[sp.Symbol, Reduction] = {}
        self._interned: dict[tuple, sp.Symbol] = {}
        self._derivatives: dict[tuple, sp.Expr] = {}

    def is_element(self, expr: sp.Expr) -> bool:
        return varies_along_row(expr, self.element_symbols)

    def row_values(self, expr: sp.Expr) -> list[sp.Symbol]:
        return sorted(expr.free_symbols & set(self.reductions), key=sp.default_sort_key)

    def intern(self, kind: str, summand: sp.Expr, index=None) -> sp.Expr:
        if summand == 0 and kind in ("sum", "take"):
            return sp.S.Zero
        if not self.is_element(summand):  # constant along the row: closed forms
            return {"sum": ROW_SIZE * summand, "logsumexp": summand + sp.log(ROW_SIZE)}.get(kind, summand)
        key = (kind, summand, index)
        if key not in self._interned:
            n = len(self.reductions)
            symbol = sp.Symbol(f"_r{n}", real=True)
            if kind in ("max", "min"):
                index = sp.Symbol(f"_a{n}", integer=True, nonnegative=True)
            self.reductions[symbol] = Reduction(symbol, kind, summand, index)
            self._interned[key] = symbol
        return self._interned[key]

    def used(self, exprs) -> set:
        """The row values that ``exprs`` use, directly or through other reductions' summands
        (a reduction replaced by a fused one is left out of the program)."""
        by_index = {r.index: r.symbol for r in self.reductions.values() if r.kind in ("max", "min")}

        def direct(expr):  # row values, and the max or min behind an arg-max index
            return self.row_values(expr) + [by_index[s] for s in expr.free_symbols if s in by_index]

        seen, stack = set(), [s for e in exprs for s in direct(e)]
        while stack:
            symbol = stack.pop()
            if symbol not in seen:
                seen.add(symbol)
                stack.extend(direct(self.reductions[symbol].summand))
        return seen

    def lower(self, expr: sp.Expr) -> sp.Expr:
        """Replace every reduction of ``expr`` by its row value, innermost first."""
        if type(expr) in KIND_OF:
            inner = self.lower(expr.args[0])
            index = expr.args[1] if isinstance(expr, take) else None
            return self.intern(KIND_OF[type(expr)], inner, index)
        if not expr.args or isinstance(expr, sp.Symbol):
            return expr
        return expr.func(*[self.lower(a) for a in expr.args])

    def weight(self, reduction: Reduction) -> sp.Expr:
        """d R / d summand(k), as an element expression."""
        if reduction.kind == "sum":
            return sp.S.One
        if reduction.kind == "logsumexp":
            return sp.exp(reduction.summand - reduction.symbol)
        return onehot(reduction.index)  # take at its index, max/min at their arg-max

    def weighted(self, reduction: Reduction, h: sp.Expr) -> sp.Expr:
        """sum_k w(k) h(k) with the weights of ``reduction``: a row value."""
        if h == 0:
            return sp.S.Zero
        if not self.is_element(h):
            return h * (ROW_SIZE if reduction.kind == "sum" else 1)  # logsumexp's weights sum to 1
        if reduction.kind == "sum":
            return self.intern("sum", h)
        if reduction.kind == "logsumexp":
            return self.intern("sum", self.weight(reduction) * h)
        return self.intern("take", h, reduction.index)

    def derivative(self, value: sp.Symbol, x: sp.Symbol) -> sp.Expr:
        """d R / d x_j for the row value R and prediction x, as an element expression at j."""
        key = (value, x)
        if key not in self._derivatives:
            reduction = self.reductions[value]
            result = self.weight(reduction) * _d(reduction.summand, x)
            for inner in self.row_values(reduction.summand):
                coefficient = self.weighted(reduction, _d(reduction.summand, inner))
                if coefficient != 0:
                    result += coefficient * self.derivative(inner, x)
            self._derivatives[key] = tidy(result)
        return self._derivatives[key]

    def gradient(self, expr: sp.Expr, x: sp.Symbol) -> sp.Expr:
        """Total derivative of a row expression with respect to x_j."""
        terms = [_d(expr, value) * self.derivative(value, x) for value in self.row_values(expr)]
        return tidy(sp.Add(*terms))

    def hessian_block(self, gradient: sp.Expr, x: sp.Symbol) -> HessianBlock:
        """d gradient(j) / d x_l for the element expression ``gradient``."""
        outer = []
        for value in self.row_values(gradient):
            p = _d(gradient, value)
            q = self.derivative(value, x)
            if p != 0 and q != 0:
                outer.append((p, q))
        return HessianBlock(_d(gradient, x), tuple(outer))


def unit_inputs(spec) -> frozenset:
    """The symbols of the row inputs whose domain is [0, 1] (probabilities, masks), for which
    1 - x is exact or nearly so: :func:`lossgen.fuse_rows.accurate` reads their sign."""
    return frozenset(spec.symbols[i.name] for i in spec.inputs
                     if i.axis and DOMAINS[i.domain].low == 0 and DOMAINS[i.domain].high == 1)


def derive_rows(spec: LossSpec) -> RowDerivation:
    """Lower a row-wise loss and derive its gradient, Hessian (diagonal, blocks) and
    Hessian-vector product with respect to each prediction."""
    predictions = [spec.symbols[p.name] for p in spec.predictions]
    directions = tuple(sp.Symbol(f"_v_{p.name}", real=True) for p in spec.predictions)
    element_symbols = {spec.symbols[i.name] for i in spec.inputs if i.axis} | set(directions)
    program = RowProgram(element_symbols)
    loss = fuse_row_cancellations(program, program.lower(spec.loss), unit_inputs(spec))
    grads = tuple(program.gradient(loss, x) for x in predictions)
    # the Hessian from the plain quotient of a single close pair, and a share's complement where
    # the share is the larger part (fuse_rows.hessian_forms)
    plain = hessian_forms(loss)
    hessian_grads = grads if plain == loss else tuple(program.gradient(plain, x) for x in predictions)
    blocks = {(i, j): program.hessian_block(hessian_grads[i], predictions[j])
              for i in range(len(predictions)) for j in range(len(predictions))}
    hess = tuple(tidy(blocks[i, i].diagonal + sp.Add(*(p * q for p, q in blocks[i, i].outer)))
                 for i in range(len(predictions)))
    used = program.used([loss, *grads, *hess, *(e for b in blocks.values() for e in _block_expressions(b))])
    cross = {(i, j): tidy(b.diagonal + sp.Add(*(p * q for p, q in b.outer)))
             for (i, j), b in blocks.items() if i != j}
    derivation = RowDerivation(spec, tuple(r for r in program.reductions.values() if r.symbol in used), loss, grads,
                               hess, blocks, frozenset(element_symbols), directions, cross=cross)
    return derivation.map(expand_shares)


def _block_expressions(block: HessianBlock):
    return [block.diagonal, *(e for pq in block.outer for e in pq)]
