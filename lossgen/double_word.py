"""A full Hessian's entries again in double-word arithmetic, where the kernels' own test says
that their outer products cancel.

An off-diagonal entry of a Hessian block is a sum of outer products, H_jl = sum_m P_m(j) Q_m(l)
(lossgen/fuse_rows.py). Where the block has several and they cancel, each product's rounding
error (a few units in the last place of |P_m(j) Q_m(l)|) is large beside the entry: global
SSIM's five, near a zero crossing of an entry, left relative errors up to 4.5e-10 on uniform
rows at C = 16. Where no exact plan over the row sums exists (:mod:`lossgen.exact_rows`: the
sums there are polynomial summands of the inputs alone; SSIM's variances read the means), the
kernels test each entry on its own products, |sum_m P_m Q_m| < t sum_m |P_m| |Q_m| with
t = EXACT_FALLBACK's threshold, and a flagged row calls a recomputation that evaluates the
kernels' own forms again in double-word arithmetic (a value as an unevaluated sum hi + lo,
about 106 bits):

- each row sum over the row in double-word (its summand's operations, then the sum), a sum
  that the kernels take exactly (stabilise_rows.exact_sums) from their exact helper;
- each P_m(k), Q_m(k) in double-word, its row-level parts once per row;
- each flagged entry (the kernels' test again, on the kernels' floats) as the double-word sum
  of the products, rounded once.

The operations are those of Joldes, Muller and Popescu, "Tight and rigorous error bounds for
basic building blocks of double-word arithmetic", ACM TOMS 44(2), 2017: a sum within 3 u^2 of
its value, a product within 4 u^2, a quotient within 15 u^2 (u = 2^-53). An entry whose products
cancel to 2^-c of their size keeps about 106 - c - (the forms' own cancellations) bits: within
the verification's 1e-12 down to c of about 60, where the kernels' floats kept 53 - c. A
Piecewise computes every branch and picks one by the sign of the double-word difference of
its condition's sides. Only the operations of :data:`OPERATIONS` are evaluated so: a block whose
forms hold another function (exp, log, a scaled norm) is not planned.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import NamedTuple

import sympy as sp
from sympy.core.relational import Relational
from sympy.functions.elementary.piecewise import ExprCondPair
from sympy.logic.boolalg import And, BooleanFalse, BooleanTrue, Or

from .exact_rows import EXACT_FALLBACK, fires, in_exact_arithmetic
from .stabilise_rows import error_tail, sum_parts
from .vocabulary import fma


@dataclass(frozen=True)
class DoubleWordBlock:
    """One Hessian block's double-word recomputation: its outer products in the kernels' forms
    (wrappers that are identities in exact arithmetic taken away) and the row sums they read."""

    outer: tuple                 # ((P, Q), ...) in exact arithmetic
    kernel_outer: tuple          # ((P, Q), ...) as the kernels compute them (their test's)
    passes: tuple                # ((Reduction, ...), ...) the sums the forms read, pass by pass over the row
    exact: frozenset             # the sums the kernels take exactly (helpers _exact<r>)

    def test(self, product: bool = False) -> tuple[list, list]:
        """The kernels' test as outer products: the entry's own (P, Q) and its bound's
        (t |P|, |Q|), t = EXACT_FALLBACK's threshold. ``product``: the bound's Q is Q itself, which
        the product's test reads as sum_l |Q(l) v_l| (emit_rows._emit_low_rank_product)."""
        threshold = sp.Float(EXACT_FALLBACK["threshold"])
        return list(self.kernel_outer), [(threshold * sp.Abs(p), q if product else sp.Abs(q))
                                         for p, q in self.kernel_outer]


def _fma_value(a, b, c):
    return a * b + c


# The stable forms' functions, each as its value in exact arithmetic (vocabulary.EXACT_VALUE,
# and the fused multiply-add); what remains must be an operation of OPERATIONS
IDENTITIES = {fma: _fma_value}


def _exact_form(expr: sp.Expr, parts: dict) -> sp.Expr:
    """``expr`` in exact arithmetic (:data:`IDENTITIES`), each part of a compensated sum as its
    share of the sum (``parts``)."""
    expr = in_exact_arithmetic(expr).xreplace(parts)
    return expr.replace(lambda e: isinstance(e, tuple(IDENTITIES)),
                        lambda e: next(f for kind, f in IDENTITIES.items() if isinstance(e, kind))(*e.args))


def _supported(expr) -> bool:
    """Does ``expr`` hold only the operations of :data:`OPERATIONS`, numbers, symbols and
    conditions (relations, and, or)?"""
    if expr.is_Symbol or expr.is_Number or isinstance(expr, (BooleanTrue, BooleanFalse)):
        return True
    if expr.is_Pow and not (expr.exp.is_Integer and expr.exp != 0):
        return False
    if not isinstance(expr, (Relational, And, Or, ExprCondPair)) and expr.func not in OPERATIONS:
        return False
    return all(_supported(a) for a in expr.args)


def plan_double_word(outer, reductions: list, exact, inputs) -> DoubleWordBlock | None:
    """The block's recomputation, or None: where it has fewer than two outer products (a single
    product cannot cancel), a row value that is not a sum (a max, a logsumexp), a symbol that is
    neither a row sum nor one of ``inputs`` (the elements, the parameters, the row's length), or
    an operation that double-word arithmetic here lacks."""
    if len(outer) < 2:
        return None
    kernel_outer = tuple(outer)
    by_symbol = {r.symbol: r for r in reductions}
    # a compensated sum's parts (hi + error = R): hi is R in double-word, the errors are in it
    parts = {part: value for r in reductions
             for part, value in zip((*sum_parts(r), error_tail(r)), (r.symbol, sp.S.Zero, sp.S.Zero))}
    outer = tuple((_exact_form(p, parts), _exact_form(q, parts)) for p, q in outer)
    needed, stack = {}, [s for pq in outer for e in pq for s in e.free_symbols]
    while stack:
        s = stack.pop()
        if s in inputs or s in needed:
            continue
        r = by_symbol.get(s)
        if r is None or r.kind != "sum":
            return None
        needed[s] = replace(r, summand=_exact_form(r.summand, parts))
        stack.extend(needed[s].summand.free_symbols)
    if not all(_supported(e) for pq in outer for e in pq) or \
            not all(_supported(r.summand) for r in needed.values()):
        return None
    return DoubleWordBlock(outer, kernel_outer, _passes(needed), frozenset(s for s in needed if s in exact))


def _passes(reductions: dict) -> tuple:
    """The reductions in passes over the row: each pass those whose summands read only the
    earlier passes' sums (by name within a pass)."""
    level: dict = {}

    def of(s):
        if s not in level:
            inner = [t for t in reductions[s].summand.free_symbols if t in reductions]
            level[s] = 1 + max((of(t) for t in inner), default=0)
        return level[s]
    for s in reductions:
        of(s)
    return tuple(tuple(sorted((r for r in reductions.values() if level[r.symbol] == n), key=lambda r: r.symbol.name))
                 for n in sorted(set(level.values())))


class DoubleWordWriter:
    """Lines of code that evaluate expressions in double-word arithmetic, each node once: a node
    is a pair of variables (hi, lo), named from ``prefix``; ``names``: {symbol or node: (hi code,
    lo code)} of the values known already. The operations are the module's helpers _dw_add,
    _dw_mul and _dw_div (templates/numba_helpers.py.j2)."""

    def __init__(self, names: dict, prefix: str, counter: list | None = None):
        self.names = dict(names)
        self.prefix = prefix
        self.lines: list[str] = []
        self.counter = counter if counter is not None else [0]

    def value(self, expr: sp.Expr) -> tuple[str, str]:
        """(hi, lo) code of ``expr``."""
        if expr in self.names:
            return self.names[expr]
        if expr.is_Number:
            return constant(expr)
        if expr.is_Symbol:
            raise KeyError(f"double-word: no value for {expr}")
        hi, lo = OPERATIONS[expr.func](self, expr)
        self.names[expr] = (hi, lo)
        return hi, lo

    def condition(self, cond) -> str:
        """Code of a Piecewise condition: a relation by the sign of its sides' double-word
        difference."""
        if isinstance(cond, BooleanTrue):
            return "True"
        if isinstance(cond, BooleanFalse):
            return "False"
        if isinstance(cond, And):
            return "(" + " and ".join(self.condition(a) for a in cond.args) + ")"
        if isinstance(cond, Or):
            return "(" + " or ".join(self.condition(a) for a in cond.args) + ")"
        hi, _ = self.value(cond.lhs - cond.rhs)
        return f"({hi} {cond.rel_op} 0.0)"

    def assign(self, code: str) -> tuple[str, str]:
        n = self.counter[0]
        self.counter[0] += 1
        hi, lo = f"{self.prefix}{n}_h", f"{self.prefix}{n}_l"
        self.lines.append(f"{hi}, {lo} = {code}")
        return hi, lo

    # the operations
    def add(self, expr) -> tuple[str, str]:
        terms = sorted(sp.Add.make_args(expr), key=sp.default_sort_key)
        total = None
        for term in terms:
            coefficient, _ = term.as_coeff_Mul()
            negative = coefficient.is_negative and term not in self.names
            hi, lo = self.value(-term if negative else term)
            if total is None:
                total = self.assign(f"-{hi}, -{lo}") if negative else (hi, lo)
                continue
            sign = "-" if negative else ""
            total = self.assign(f"_dw_add({total[0]}, {total[1]}, {sign}{hi}, {sign}{lo})")
        return total

    def mul(self, expr) -> tuple[str, str]:
        coefficient, factors = expr.as_coeff_mul()
        above = [f for f in factors if not (f.is_Pow and f.exp.is_negative)]
        below = [f.base ** -f.exp for f in factors if f.is_Pow and f.exp.is_negative]
        value = self.product(sorted(above, key=sp.default_sort_key))
        if below:
            denominator = self.product(sorted(below, key=sp.default_sort_key))
            value = self.assign(f"_dw_div({value[0]}, {value[1]}, {denominator[0]}, {denominator[1]})")
        return self.scaled(value, coefficient)

    def product(self, factors) -> tuple[str, str]:
        value = None
        for f in factors:
            hi, lo = self.value(f)
            value = (hi, lo) if value is None else self.assign(f"_dw_mul({value[0]}, {value[1]}, {hi}, {lo})")
        return value if value is not None else ("1.0", "0.0")

    def scaled(self, value, coefficient) -> tuple[str, str]:
        """``value`` times a number: exact where it is a power of two (up to its sign)."""
        if coefficient == 1:
            return value
        magnitude = abs(coefficient)
        if magnitude.is_Integer and int(magnitude) & (int(magnitude) - 1) == 0 or \
                magnitude.is_Rational and magnitude.p == 1 and magnitude.q & (magnitude.q - 1) == 0:
            c = repr(float(coefficient))
            return self.assign(f"{value[0]} * {c}, {value[1]} * {c}")
        hi, lo = constant(coefficient)
        return self.assign(f"_dw_mul({value[0]}, {value[1]}, {hi}, {lo})")

    def power(self, expr) -> tuple[str, str]:
        base, n = expr.base, int(expr.exp)
        if n < 0:
            hi, lo = self.value(base ** -n)
            return self.assign(f"_dw_div(1.0, 0.0, {hi}, {lo})")
        result, square = None, self.value(base)
        while True:  # by squaring: x**5 = x * (x**2)**2
            if n & 1:
                result = square if result is None else self.assign(
                    f"_dw_mul({result[0]}, {result[1]}, {square[0]}, {square[1]})")
            n >>= 1
            if not n:
                return result
            square = self.assign(f"_dw_mul({square[0]}, {square[1]}, {square[0]}, {square[1]})")

    def piecewise(self, expr) -> tuple[str, str]:
        branches = [(self.value(e), self.condition(c)) for e, c in expr.args]
        (hi, lo), _ = branches[-1]
        code = f"({hi}, {lo})"
        for (h, l), c in reversed(branches[:-1]):
            code = f"({h}, {l}) if {c} else {code}"
        return self.assign(code)

    def absolute(self, expr) -> tuple[str, str]:
        hi, lo = self.value(expr.args[0])
        return self.assign(f"(-{hi}, -{lo}) if {hi} < 0.0 else ({hi}, {lo})")


# How each node is evaluated (a table, as SymPy's printers' _print_<Node>)
OPERATIONS = {sp.Add: DoubleWordWriter.add, sp.Mul: DoubleWordWriter.mul, sp.Pow: DoubleWordWriter.power,
              sp.Piecewise: DoubleWordWriter.piecewise, sp.Abs: DoubleWordWriter.absolute}


def constant(number) -> tuple[str, str]:
    """A number as a double-word: its nearest float and the nearest float to the rest."""
    exact = sp.Rational(number)  # a Float's own binary value
    hi = float(exact)
    lo = float(exact - sp.Rational(hi))
    return repr(hi), repr(lo)


def row_level_parts(expr, is_element) -> list:
    """The largest subexpressions of ``expr`` that hold no element value (computed once a row),
    numbers and symbols left out."""
    if isinstance(expr, sp.Expr) and not expr.is_Atom and not is_element(expr):
        return [expr]
    if expr.is_Atom:
        return []
    return [p for a in expr.args for p in row_level_parts(a, is_element)]


class DoubleWordRecompute(NamedTuple):
    """One block's part of a row's recomputation (:func:`emit_double_word_blocks`)."""
    block: DoubleWordBlock
    out: str                 # the output array
    flags: int               # the kernels' scratch row of the rows j to recompute
    numerator: str           # the code of entry (_j, _l)'s test from the kernels' floats: its value
    bound: str               # and its bound (the kernels' scratch rows)


def emit_double_word_blocks(body, blocks: list[DoubleWordRecompute], printed, exact_call):
    """The body of a row's recomputation of its flagged entries (:class:`DoubleWordRecompute`)
    in double-word arithmetic: the row sums pass by pass, the outer products' factors at every
    element (row-level parts once), and in each flagged row j every entry (j, l), l != j, whose
    test fires again on the kernels' floats, written to the block's ``out`` at output row _o
    where finite. ``body``: an emit_rows._Body; ``printed(symbol)``: the code of an input or
    parameter; ``exact_call(symbol)``: the code that returns an exact sum's (hi, lo)."""
    body.bind_row()
    reductions = {r.symbol: r for b in blocks for p in b.block.passes for r in p}
    exact = set().union(*(b.block.exact for b in blocks))
    counter = [0]
    names = {}

    def known(exprs):
        used = set().union(*(e.free_symbols for e in exprs)) if exprs else set()
        return {s: (printed(s), "0.0") for s in used if s not in reductions}

    elements = set(body.element) | set(body.directions)

    def hoisted(exprs, prefix) -> DoubleWordWriter:
        """A writer that knows ``exprs``' row-level parts, computed once (lines at row level),
        their common subexpressions once too."""
        parts = list(dict.fromkeys(p for e in exprs for p in row_level_parts(e, lambda x: bool(x.free_symbols & elements))))
        writer = DoubleWordWriter({**names, **known(exprs)}, prefix, counter)
        replacements, reduced = sp.cse(parts, symbols=sp.numbered_symbols(f"{prefix}_cse"))
        conditions = {}  # a shared condition (a >= b) stays in its Piecewises: a condition is no value
        for symbol, value in replacements:
            value = value.xreplace(conditions)
            if isinstance(value, sp.Expr):
                writer.names[symbol] = writer.value(value)
            else:
                conditions[symbol] = value
        reduced = [e.xreplace(conditions) for e in reduced]
        for part, value in zip(parts, reduced):
            writer.names[part] = writer.value(value)
        for line in writer.lines:
            body.emit(2, line)
        writer.lines = []
        return writer

    for n, reductions_pass in enumerate(_passes(reductions)):
        looped = [r for r in reductions_pass if r.symbol not in exact]
        for r in reductions_pass:
            if r.symbol in exact:
                body.emit(2, f"{r.symbol}_h, {r.symbol}_l = {exact_call(r.symbol)}")
            else:
                body.emit(2, f"{r.symbol}_h = 0.0")
                body.emit(2, f"{r.symbol}_l = 0.0")
        if looped:
            writer = hoisted([r.summand for r in looped], f"_ds{n}_")
            body.emit(2, "for _k in range(_n):")
            body.bind([r.summand for r in looped], 3)
            terms = [writer.value(r.summand) for r in looped]
            for line in writer.lines:
                body.emit(3, line)
            for r, (hi, lo) in zip(looped, terms):
                body.emit(3, f"{r.symbol}_h, {r.symbol}_l = _dw_add({r.symbol}_h, {r.symbol}_l, {hi}, {lo})")
        names.update({r.symbol: (f"{r.symbol}_h", f"{r.symbol}_l") for r in reductions_pass})
    # Q_m(l) at every element into a scratch row, P_m(j) at the flagged rows j alone
    rights = [q for b in blocks for _, q in b.block.outer]
    row = hoisted([e for b in blocks for pq in b.block.outer for e in pq], "_dr")

    def at_element(exprs, prefix):
        """Lines (in the loop at element _k) computing ``exprs``; their (hi, lo) code."""
        body.bind(exprs, 3)
        element = DoubleWordWriter(row.names, prefix, counter)
        values = [element.value(e) for e in exprs]
        for line in element.lines:
            body.emit(3, line)
        return values

    body.emit(2, f"_dw = np.empty(({2 * len(rights)}, _n))")
    body.emit(2, "for _k in range(_n):")
    for n, (hi, lo) in enumerate(at_element(rights, "_dq")):
        body.emit(3, f"_dw[{2 * n}, _k] = {hi}")
        body.emit(3, f"_dw[{2 * n + 1}, _k] = {lo}")
    first = 0
    for b in blocks:
        lefts = [p for p, _ in b.block.outer]
        body.emit(2, "for _j in range(_n):")
        body.emit(3, f"if _scratch[{b.flags}, _j] == 0.0:")
        body.emit(4, "continue")
        body.emit(3, "_k = _j")
        left_values = at_element(lefts, "_dp")
        body.emit(3, "for _l in range(_n):")
        body.emit(4, "if _l == _j:")
        body.emit(5, "continue")
        body.emit(4, f"_xnl = {b.numerator}")
        body.emit(4, f"_xbl = {b.bound}")
        body.emit(4, f"if not ({fires('_xnl', '_xbl')}):")
        body.emit(5, "continue")
        for m, (hi, lo) in enumerate(left_values):
            q = 2 * (first + m)
            product = f"_dw_mul({hi}, {lo}, _dw[{q}, _l], _dw[{q + 1}, _l])"
            if m == 0:
                body.emit(4, f"_sh, _sl = {product}")
            else:
                body.emit(4, f"_ph, _pl = {product}")
                body.emit(4, "_sh, _sl = _dw_add(_sh, _sl, _ph, _pl)")
        body.emit(4, "_xq = _sh + _sl")
        body.emit(4, "if math.isfinite(_xq):")
        body.emit(5, f"{b.out}[_o, _j, _l] = _w * _xq")
        first += len(b.block.outer)
