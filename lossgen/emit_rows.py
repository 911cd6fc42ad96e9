"""Stage 4 for row-wise losses: a row program -> Numba kernels, parallel over rows.

Each kernel handles one row per ``prange`` iteration, in passes over the row (in cache
after the first): one pass per level of reductions (a reduction whose summand uses another
reduction comes a level later), then one pass writing the element outputs. Row values that
element outputs need are computed once per row, before that pass.

How each kind of reduction is computed (the table :data:`LOOP_CODE`):

* ``sum``: compensated summation (Knuth's two-sum), so cancelling terms of a row keep their
  digits; ``take``: the summand at the row's index, no loop;
* ``max``/``min``: the value and its first arg-max (the derivative's convention on ties);
* ``logsumexp``: R = M + L with M = max_k g_k and L = log1p(S), S = sum_{k != argmax} exp(g_k - M).
  Every g - R is then printed as (g - M) - L, and R - T as (M - T) + L: the shift cancels
  exactly first, so log-softmax and cross-entropy keep their digits next to 0.
  Where the element outputs hold the softmax weight p = exp(g - R), each exp(g_k - M) of
  that pass is kept (in a scratch row, ``_stash``) and p is E_k/(1 + S), a product, not a
  second exponential; expm1(g - R) is p - 1, except at the arg-max, where it is -S/(1 + S)
  (1 - p cancels only there: every other p is at most 1/2). Softmax cross-entropy's loss,
  gradient and Hessian take one exponential per element and no expm1.

Loops that vectorise (:meth:`_Body.plan_vector`): libm's exp is a call per element and keeps a
loop scalar, so where the functions allow (emit.kernel_vectorises, the elementwise kernels' rule)
a row's loops take the vectorising helpers (_vexp, _vexpm1, _vlog1p). A log-sum-exp's terms
exp(g_k - M), and a sum's terms that take an exponential, are computed by a loop of their own
into a scratch row (``_stash``), which the reduction's loop then reads and sums in the same order
as before (that loop stays scalar: its additions are in order). An element pass takes them where
every element takes an exponential. Each function value has one implementation in a kernel: a
loop that shares an exponential's argument with a row value or a loop staying scalar stays scalar.
"""
from __future__ import annotations

from dataclasses import replace

import sympy as sp
from sympy.codegen.cfunctions import expm1, log1p

from .derive_rows import ROW_KERNELS, Reduction, RowDerivation, varies_along_row
from .domains import DOMAINS, axis_ranges
from .double_word import DoubleWordBlock, DoubleWordRecompute, emit_double_word_blocks, plan_double_word
from .emit import MARKER, NumbaPrinter, code_form, kernel_vectorises, scoped_code, template_environment
from .exact_rows import (EXACT_FALLBACK, BlockRecompute, add_split_lines, disagrees, emit_block_fallback,
                         emit_exact_sum, emit_fallback, fires, plan, plan_block, split_product_lines)
from .reductions import ROW_SIZE, onehot
from .stabilise_rows import SAFE_SQUARES, ScaledNorm, ScaledPair, error_tail, sum_parts, value_indices
from .vocabulary import SOFTMAX_TIE_THRESHOLD, group, in_scale, softmax_tie_helper, two_scaled

INDENT = "    "
# the line of a fast row function that hands the row to the scaled one (templates/row_module.py.j2)
SCALED_ROW = "_SCALED_ROW"
# the row's weight (None: 1). The runtime passes None where no sample weights are given: an empty
# array instead compiled one kernel for calls with and without weights, but made
# softmax_cross_entropy's kernels 1.04-1.06 times slower at C = 3 and 10, N = 200000 (the multiply
# by 1 no longer folds away)
ROW_WEIGHT = "_w = 1.0 if _weight is None else _weight[_i]"


class RowPrinter(NumbaPrinter):
    """NumbaPrinter plus onehot(index) = 1 at the element being computed (``_k``)."""

    def __init__(self, row_arguments=()):
        super().__init__()
        self.row_arguments = list(row_arguments)  # the kernels' inputs and parameters, in order
        self.softmax_ties: set = set()  # the names of the helpers _tie<R> that the kernels call

    def _print_onehot(self, expr):
        return f"(1.0 if _k == {self._print(expr.args[0])} else 0.0)"

    def _print_two_scaled(self, expr):
        x, n = expr.args
        terms = []
        for term in sp.Add.make_args(n):
            c, e = term.as_coeff_Mul()
            terms.append(self._print(e) if c == 1 else f"-{self._print(e)}" if c == -1 else f"{int(c)}*{self._print(e)}")
        self.helpers_used.add("two_scaled")
        return f"_two_scaled({self._print(x)}, {' + '.join(terms)})"

    def _print_in_scale(self, expr):
        return f"(({self._print(expr.args[0])}) * {self._print(expr.args[1])})"

    def _print_softmax_tie(self, expr):
        """The form d, or where its terms cancel the helper _tie<R> (:func:`emit_softmax_tie`)."""
        d, size, c, helper = expr.args
        self.softmax_ties.add(helper.name)
        arguments = ", ".join(["_i", "_n", "_C", *self.row_arguments, self._print(c)])
        value = self._print(d)
        return (f"({value} if not abs({value}) < {SOFTMAX_TIE_THRESHOLD!r} * ({self._print(size)}) "
                f"else {helper}({arguments}))")


# renamed symbols keep their assumptions: without them SymPy may decide Eq(x, 0) is False
# and drop the Piecewise branch of a kink
def _element_name(symbol) -> sp.Symbol:
    name = f"_e{symbol.name}" if symbol.name.startswith("_") else f"_e_{symbol.name}"
    return sp.Symbol(name, **symbol.assumptions0)


def _row_name(symbol) -> sp.Symbol:
    return sp.Symbol(f"_row_{symbol.name}", **symbol.assumptions0)


# --- logsumexp: R = M + L, with the shift cancelling first -----------------------------------

def _group_shift(expr: sp.Expr, shifts: set, tails: set) -> sp.Expr:
    """In every sum holding a shift M and a tail L, add the terms without a tail first."""
    if not expr.args or isinstance(expr, sp.Symbol):
        return expr
    expr = expr.func(*[_group_shift(a, shifts, tails) for a in expr.args])
    if isinstance(expr, sp.Add) and expr.free_symbols & shifts and expr.free_symbols & tails:
        big = [t for t in expr.args if not t.free_symbols & tails]
        small = [t for t in expr.args if t.free_symbols & tails]
        if len(big) > 1:
            return group(sp.Add(*big)) + sp.Add(*small)
    return expr


class _Shifts:
    """Every logsumexp reduction R as M + L: a max reduction M and a tail L."""

    def __init__(self, reductions):
        self.replacements, self.shifts, self.tails = {}, set(), set()
        self.expanded: list[Reduction] = []
        # a max the program has of the same summand is the shift (stabilise_rows.top_two)
        maxima = {q.summand: q for q in reductions if q.kind == "max"}
        for r in reductions:
            if r.kind != "logsumexp":
                self.expanded.append(r)
                continue
            n = r.symbol.name[2:]
            m, a, tail = (sp.Symbol(f"_m{n}", real=True), sp.Symbol(f"_a{n}", integer=True),
                          sp.Symbol(f"_l{n}", real=True))
            if r.summand in maxima:
                m, a = maxima[r.summand].symbol, maxima[r.summand].index
            else:
                self.expanded.append(Reduction(m, "max", r.summand, a))
            self.expanded.append(Reduction(tail, "logsumexp_tail", r.summand, (m, a)))
            self.replacements[r.symbol] = m + tail
            self.shifts.add(m)
            self.tails.add(tail)

    def __call__(self, expr: sp.Expr) -> sp.Expr:
        if not self.replacements:
            return expr
        return _group_shift(expr.xreplace(self.replacements), self.shifts, self.tails)


def _rest_of(tail: sp.Symbol) -> sp.Symbol:
    """1 - p_a = S/(1 + S) of a stashed logsumexp tail L = log1p(S), a at its arg-max."""
    return sp.Symbol(f"{tail.name}_rest", nonnegative=True)


# --- kernel bodies ---------------------------------------------------------------------------

class _Body:
    """Lines of one kernel's row loop, built pass by pass."""

    def __init__(self, derivation: RowDerivation, printer: RowPrinter, tie_keys: dict, scaled: bool = False):
        self.derivation, self.printer, self.tie_keys = derivation, printer, tie_keys
        # the row function for rows whose norms left the safe range (rescale), else the fast one
        self.scaled = scaled
        spec = derivation.spec
        self.shifts = _Shifts(derivation.reductions)
        self.reductions = {r.symbol: Reduction(r.symbol, r.kind, self.shifts(r.summand), r.index)
                           for r in self.shifts.expanded}
        self.element = {spec.symbols[i.name]: i for i in spec.inputs if i.axis}
        self.directions = set(derivation.directions)
        self.per_row = {spec.symbols[i.name]: i for i in spec.inputs if not i.axis}
        self.lines: list[str] = []
        self._temporaries = 0
        self.stashed: dict = {}  # logsumexp tail L -> (its slot in _stash, the weight's symbol p)
        self.slots = 0  # scratch rows (_stash) that the kernel uses
        self.vector_passes: dict = {}  # reduction -> its slot in _stash, where a loop of its own computes its terms
        self.vector_reductions: set = set()  # reductions whose terms a loop of their own computes (plan_vector)
        self.checks: list[str] = []  # the scaled norms' range checks (in_scales)

    def is_element(self, expr: sp.Expr) -> bool:
        weights = {p for _, p in self.stashed.values()}
        return varies_along_row(expr, self.derivation.element_symbols | weights)

    def stash_softmax(self, exprs: list[sp.Expr]) -> list[sp.Expr]:
        """``exprs`` with each softmax weight exp((g - M) - L) of a logsumexp R = M + L of
        summand g as a symbol p, computed from that pass's exp(g - M) (see the module
        docstring), and expm1((g - M) - L) as p - 1, -S/(1 + S) at the arg-max. Not where a
        reduction sums the weights themselves."""
        replacements = {}
        for r in self.reductions.values():
            if r.kind != "logsumexp_tail":
                continue
            m = r.index[0]
            u = group(r.summand - m) - r.symbol
            if not any(e.has(sp.exp(u)) for e in exprs):
                continue
            if any(q.summand.has(sp.exp(u), expm1(u)) for q in self.reductions.values()):
                # a reduction sums the weights (simplex weights: 1 - p_k - p_y as the sum of the
                # other classes, its own terms taken out exactly): its terms and the p_k taken out
                # must be the same floats, exp((g - M) - L) both
                continue
            p = sp.Symbol(f"_p{r.symbol.name[2:]}", positive=True)
            self.stashed[r.symbol] = (self.slots, p)
            self.slots += 1
            replacements[sp.exp(u)] = p
            # p_a = 1/(1 + S) at the arg-max a, so 1 - p_a = S/(1 + S) (row-level, no expm1);
            # every other p_k <= p_a and p_k + p_a <= 1, so p_k <= 1/2 and p_k - 1 does not cancel
            replacements[expm1(u)] = sp.Piecewise((-_rest_of(r.symbol), sp.Eq(onehot(r.index[1]), 1)), (p - 1, True))
        return [e.xreplace(replacements) for e in exprs]

    def bind_weights(self, exprs, indent: int):
        """Read the stashed softmax weights that ``exprs`` use, at element ``_k``."""
        used = set().union(*(e.free_symbols for e in exprs)) if exprs else set()
        for tail, (slot, p) in self.stashed.items():
            if p in used:
                self.emit(indent, f"{p} = _stash[{slot}, _k] * {tail}_inv")

    def hoist(self, exprs) -> tuple[list[sp.Expr], dict]:
        """``exprs`` with their row-level parts named (see :func:`_hoist`), and {part: name}."""
        hoisted: dict = {}
        return [_hoist(e, self.is_element, hoisted) for e in exprs], hoisted

    def bind_row(self):
        """Read the per-row inputs of row ``_i``."""
        for symbol in self.per_row:
            self.emit(2, f"{_row_name(symbol)} = {symbol.name}[_i]")

    # names
    def rename(self, expr: sp.Expr) -> sp.Expr:
        mapping = {s: _element_name(s) for s in expr.free_symbols if s in self.element or s in self.directions}
        mapping.update({s: _row_name(s) for s in expr.free_symbols if s in self.per_row})
        return code_form(expr.xreplace(mapping))

    def bind(self, exprs, indent: int):
        """Read the element symbols that ``exprs`` use, at element ``_k`` of row ``_i``."""
        used = set().union(*(e.free_symbols for e in exprs)) if exprs else set()
        for symbol in sorted(used & (set(self.element) | self.directions), key=lambda s: s.name):
            source = self.element.get(symbol)
            at = "[_k]" if source is not None and source.shared else "[_i, _k]"
            self.emit(indent, f"{_element_name(symbol)} = {symbol.name}{at}")

    def emit(self, indent: int, text: str):
        self.lines.append(INDENT * indent + text)

    def in_scales(self, emit_values):
        """``emit_values(fold)``: in the fast row function (rows whose norms' sums of squares are in
        range, stabilise_rows.scaled_norms) first a comparison per norm, which hands a row out of
        range to the scaled row function (a marker line for the template), then the values with
        every scale folded away (x 2**0 = x, g/1 = g), the code of the kernels before; in the
        scaled row function, the values as they are."""
        if self.scaled or not self.checks:
            emit_values(lambda exprs: exprs)
            return
        self.emit(2, f"if not ({' and '.join(self.checks)}):")
        self.emit(3, SCALED_ROW)
        ones = {}
        for n in self.derivation.scaled:
            ones.update({n.exponent: 0, n.inverse: 1})
            ones.update({e: 0 for e in getattr(n, "ratio_exponents", ())})
        emit_values(lambda exprs: [_folded(e).xreplace(ones) for e in exprs])

    def cse(self, exprs: list[sp.Expr], indent: int, vector: bool = False) -> list[str]:
        """Assignments for the shared subexpressions; returns the printed ``exprs``. With
        ``vector`` (a loop that vectorises, see :meth:`vectorises`), exp, expm1 and log1p as
        the VECTOR_FUNCTIONS' helpers, and every branch computed for every element."""
        n = self._temporaries
        self._temporaries += 1
        with self.printer.vectorised(vector):
            lines, printed = scoped_code([self.rename(e) for e in exprs], self.printer, f"_t{n}_", f"_b{n}_")
        for line in lines:
            self.emit(indent, line)
        return printed

    def vectorises(self, exprs, exponential: bool = True) -> bool:
        """Whether a loop over the row computing ``exprs`` at each element vectorises with the
        VECTOR_FUNCTIONS' helpers: emit.kernel_vectorises, the elementwise kernels' rule (an
        exponential, and otherwise arithmetic and the helpers around the exponentials; onehot
        is a select), and every element takes an exponential in the scalar loop (whichever
        branches it takes): vectorised, every branch is computed for every element, which does
        not pay where the exponentials lie in branches that elements seldom take (softmax
        cross-entropy's element pass with label smoothing, whose weights come from the
        scratch row: 1.03-1.04x the time serially, CPU time, medians of 7). Without
        ``exponential``: once an exponential of them is taken."""
        exprs = [self.rename(e) for e in exprs]
        return kernel_vectorises(exprs, frozenset({"onehot"}), exponential) \
            and (not exponential or any(_always_exponential(e) for e in exprs))

    def plan_vector(self, row_values: list[sp.Expr], element: list[sp.Expr]) -> bool:
        """Which loops over the row vectorise, with the VECTOR_FUNCTIONS' helpers in place of
        libm's functions; returns whether the element pass does (the reductions that do are
        kept in ``vector_reductions``). A reduction's loop vectorises by a loop of its own that
        writes its terms into a scratch row (_stash), which the reduction's loop then reads and
        sums in the same order, as before (its additions in order stay scalar): a log-sum-exp's
        exp(g_k - M) (its softmax weights' row where stashed) and a sum's terms where they take
        an exponential.

        Each function value is computed by one implementation throughout the kernel: a loop
        that takes exp(a) (or expm1, log1p, log) of an argument that a loop or row value staying
        scalar also takes stays scalar too (a sum of softmax weights takes some of them out
        again, the weight at a take's index among them, and those must be the same floats).
        Row values (one per row) always take libm's."""
        needed = self.needed(row_values + element)
        takes = {r.symbol: r.summand for r in needed if r.kind == "take"}

        def calls(exprs):
            return set().union(*(_calls(self.rename(e.xreplace(takes))) for e in exprs)) if exprs else set()

        # place -> (vectorises, the calls it takes)
        places = {"element": (bool(element) and self.vectorises(element), calls(element)),
                  "row": (False, calls(row_values + list(takes.values())))}
        for r in needed:
            if r.kind == "logsumexp_tail":
                places[r.symbol] = (self.vectorises([r.summand], exponential=False),
                                    calls([sp.exp(r.summand - r.index[0])]))
            elif r.kind != "take":
                places[r.symbol] = (r.kind == "sum" and self.vectorises([r.summand]), calls([r.summand]))
        vector = {place for place, (v, _) in places.items() if v}
        changed = True
        while changed:
            scalar = set().union(*(c for place, (_, c) in places.items() if place not in vector))
            changed = False
            for place in sorted(vector, key=str):
                if places[place][1] & scalar:
                    vector.discard(place)
                    changed = True
        self.vector_reductions = vector - {"element", "row"}
        return "element" in vector

    # reductions
    def needed(self, exprs) -> list[Reduction]:
        """The reductions ``exprs`` depend on, directly or through other reductions."""
        owner = self.owners()
        used = {s for e in exprs for s in e.free_symbols}
        seen, stack = set(), [s for s in used if s in self.reductions] + [owner[s] for s in used if s in owner]
        for pair in self.pairs_used(used):  # a pair's scale: both norms' scales
            stack += [n.reduction.symbol for n in pair.norms]
        while stack:
            symbol = stack.pop()
            if symbol in seen:
                continue
            seen.add(symbol)
            r = self.reductions[symbol]
            stack.extend(s for s in r.summand.free_symbols if s in self.reductions)
            stack.extend(owner[s] for s in r.summand.free_symbols if s in owner)
            if r.kind == "logsumexp_tail":
                stack.append(r.index[0])
            if r.kind == "take" and r.index in owner:  # a take at a max's arg-max
                stack.append(owner[r.index])
        return [self.reductions[s] for s in sorted(seen, key=lambda s: s.name)]

    def owners(self) -> dict:
        """{part: reduction} for the symbols that stand for part of a reduction (a max's arg-max,
        a sum's two parts from stabilise_rows.sum_parts): a part needs its reduction even where
        the reduction's value is not used."""
        owner = {r.index: r.symbol for r in self.reductions.values() if r.kind in ("max", "min")}
        owner.update({part: r.symbol for r in self.reductions.values() if r.kind == "sum"
                      for part in (*sum_parts(r), error_tail(r))})
        owner.update({part: tail for tail, (_, p) in self.stashed.items() for part in (p, _rest_of(tail))})
        owner.update({part: n.reduction.symbol for n in self.derivation.scaled if isinstance(n, ScaledNorm)
                      for part in (n.scale, n.inverse, n.exponent)})
        return owner

    def pairs_used(self, used) -> list:
        """The scaled pairs (stabilise_rows.ScaledPair) whose scale or sums ``used`` holds."""
        pairs = []
        for pair in self.derivation.scaled:
            if isinstance(pair, ScaledPair):
                symbols = {pair.scale, pair.inverse, pair.exponent, *pair.ratio_exponents}
                symbols |= {part for r, _ in pair.sums for part in (r.symbol, *sum_parts(r))}
                if used & symbols:
                    pairs.append(pair)
        return pairs

    def level(self, r: Reduction, memo: dict, owner: dict) -> int:
        """1 + the level of the reductions ``r`` reads (``owner``: :meth:`owners`)."""
        if r.symbol not in memo:
            inner = [self.reductions[s] for s in r.summand.free_symbols if s in self.reductions]
            inner += [self.reductions[owner[s]] for s in r.summand.free_symbols if s in owner]  # an arg-max
            if r.kind == "logsumexp_tail":
                inner.append(self.reductions[r.index[0]])
            if r.kind == "take" and r.index in owner:  # at a max's or min's arg-max: after that reduction
                inner.append(self.reductions[owner[r.index]])
            memo[r.symbol] = 1 + max((self.level(i, memo, owner) for i in inner), default=0)
        return memo[r.symbol]

    def reductions_pass(self, exprs):
        """Compute every reduction that ``exprs`` need, level by level."""
        memo: dict = {}
        needed = self.needed(exprs)
        used = {s for e in exprs for s in e.free_symbols}
        used |= {s for r in needed for s in r.summand.free_symbols}
        pending = self.pairs_used(used | {r.symbol for r in needed})
        done: set = set()
        owner = self.owners()
        for level in sorted({self.level(r, memo, owner) for r in needed}):
            at_level = [r for r in needed if memo[r.symbol] == level]
            for r in (r for r in at_level if r.kind == "take"):
                self.emit(2, f"_k = {self.printer.doprint(self.rename(r.index))}")
                self.bind([r.summand], 2)
                (value,) = self.cse([r.summand], 2)
                self.emit(2, f"{r.symbol} = {value}")
            looped = [r for r in at_level if r.kind != "take"]
            if not looped:
                continue
            keys = {r.symbol: self.tie_keys.get(r.symbol) for r in looped}
            vector = [r for r in looped if r.symbol in self.vector_reductions]
            for r in vector:
                if r.symbol in self.stashed:
                    self.vector_passes[r.symbol] = self.stashed[r.symbol][0]
                else:
                    self.vector_passes[r.symbol] = self.slots
                    self.slots += 1
            kinds = {r.symbol: r.kind + ("_products" if r.symbol in self.derivation.products else "")
                     + ("_twofold" if r.kind == "sum" and error_tail(r) in used else "")
                     + ("_keyed" if keys[r.symbol] is not None else "")
                     + ("_stashed" if r.symbol in self.stashed else "")
                     + ("_read" if r.symbol in self.vector_passes and r.kind != "sum" else "") for r in looped}
            exact = {r.symbol: EXACT_SUM[kinds[r.symbol]] for r in looped if r.symbol in self.derivation.exact
                     and (r.symbol not in self.derivation.products or used & set(sum_parts(r)))}
            for r in looped:
                for line in LOOP_CODE[kinds[r.symbol]]["start"] + exact.get(r.symbol, {}).get("start", []):
                    self.emit(2, line.format(**self.names(r)))
            if vector:
                # the terms, into scratch rows: no branch, no libm call, so LLVM vectorises the loop
                self.emit(2, "for _k in range(_n):")
                self.bind([r.summand for r in vector], 3)
                for r, value in zip(vector, self.cse([r.summand for r in vector], 3, vector=True)):
                    slot = self.vector_passes[r.symbol]
                    if r.kind == "logsumexp_tail":
                        self.emit(3, f"_s = {value}")
                        with self.printer.vectorised():
                            value = self.printer._call("exp", f"_s - {r.index[0]}")
                    self.emit(3, f"_stash[{slot}, _k] = {value}")
            in_vector = {r.symbol for r in vector}
            # a sum of products a b whose error part takes each product's rounding error too
            # (stabilise_rows.product_errors): its factors printed with the summands
            products = [r for r in looped if kinds[r.symbol] == "sum_products"]
            self.emit(2, "for _k in range(_n):")
            summands = [r.summand for r in looped if r.symbol not in in_vector] \
                + [key for key in keys.values() if key is not None] \
                + [f for r in products for f in self.derivation.products[r.symbol]]
            self.bind(summands, 3)
            values = iter(self.cse(summands, 3))
            printed = {r.symbol: (f"_stash[{self.vector_passes[r.symbol]}, _k]" if r.symbol in in_vector
                                  else next(values)) for r in looped}
            printed_keys = {symbol: next(values) for symbol, key in keys.items() if key is not None}
            printed_factors = {r.symbol: (next(values), next(values)) for r in products}
            if products:
                self.printer.helpers_used.add("fma")
            for r in looped:
                self.emit(3, f"_s = {printed[r.symbol]}")
                if r.symbol in printed_keys:
                    self.emit(3, f"_key = {printed_keys[r.symbol]}")
                factors = dict(zip("ab", printed_factors.get(r.symbol, ())))
                for line in LOOP_CODE[kinds[r.symbol]]["step"] + exact.get(r.symbol, {}).get("step", []):
                    self.emit(3, line.format(**self.names(r), **factors))
            for r in looped:
                for line in LOOP_CODE[kinds[r.symbol]]["finish"]:
                    self.emit(2, line.format(**self.names(r)))
            if exact:
                self.printer.helpers_used.update(("xexact", "fma"))
            spec = self.derivation.spec
            arguments = ", ".join([i.name for i in spec.inputs] + [p.name for p in spec.params])
            for r in (r for r in looped if r.symbol in exact):
                code = exact[r.symbol]
                test = code["test"].format(**self.names(r), threshold=repr(code["threshold"]))
                for line in EXACT_SUM_FINISH + [INDENT * 2 + reset for reset in code["reset"]]:
                    self.emit(2, line.format(**self.names(r), arguments=arguments, test=test))
            scaled = {n.reduction.symbol: n for n in self.derivation.scaled if isinstance(n, ScaledNorm)}
            for r in looped:
                if r.symbol in scaled:
                    self.rescale(r, scaled[r.symbol])
            done |= {r.symbol for r in at_level}
            for pair in list(pending):
                members = {n.reduction.symbol for n in pair.norms}
                members |= {r.symbol for r, _ in pair.sums if r.symbol in {q.symbol for q in needed}}
                if members <= done:
                    self.rescale_pair(pair, [(r, s) for r, s in pair.sums if r.symbol in members])
                    pending.remove(pair)

    def rescale(self, r: Reduction, norm):
        """A norm's sum of squares R = sum(g**2) in a binary scale (stabilise_rows.scaled_norms):
        1 where R is within SAFE_SQUARES (one comparison; NaN and inf fail it too), else the
        row's sum again over g/P, P = 2**e the power of two of max |g_k| (the helper
        _scaled_squares, out of line: the row's code stays as compact as before)."""
        low, high = SAFE_SQUARES
        names = {**self.names(r), "low": repr(low), "high": repr(high)}
        if not self.scaled:
            self.checks.append("{r} >= {low} and {r} <= {high}".format(**names))
            return
        self.printer.helpers_used.add("scaled_squares")
        self.emit(2, "{r}_e = 0".format(**names))
        self.emit(2, "{r}_Pinv = 1.0".format(**names))
        self.emit(2, "if not ({r} >= {low} and {r} <= {high}):".format(**names))
        self.emit(3, "_g = np.empty(_n)")
        self.emit(3, "for _k in range(_n):")
        self.bind([norm.g], 4)
        self.emit(4, f"_g[_k] = {self.printer.doprint(self.rename(norm.g))}")
        self.emit(3, "{r}, {r}_hi, {r}_error, {r}_e, {r}_Pinv = _scaled_squares(_g, {r}, {r}_hi, {r}_error)"
                  .format(**names))

    def rescale_pair(self, pair, sums):
        """The mixed values of a close pair of scaled norms in the larger of their scales
        (stabilise_rows.ScaledPair): 1 unless a norm left the safe range; else its sums again
        (the helper _scaled_products, out of line)."""
        if not self.scaled:
            return
        p = pair.exponent.name[:-2]
        e0, e1 = (n.exponent.name for n in pair.norms)
        self.emit(2, f"{p}_e = max({e0}, {e1})")
        for n, ratio in zip(pair.norms, pair.ratio_exponents):
            self.emit(2, f"{ratio} = {n.exponent} - {p}_e")
        self.emit(2, f"{p}_Pinv = 1.0")
        self.emit(2, f"if {p}_e != 0:")
        self.emit(3, f"{p}_Pinv = math.ldexp(1.0, -{p}_e)")
        if not sums:
            return
        self.printer.helpers_used.add("scaled_squares")
        factors = []
        for _, summand in sums:
            if isinstance(summand, sp.Pow):
                factors.append((summand.base.args[0], summand.base.args[0]))
            else:
                u, v = [f.args[0] for f in sp.Mul.make_args(summand) if isinstance(f, in_scale)]
                constant = sp.Mul(*(f for f in sp.Mul.make_args(summand) if not isinstance(f, in_scale)))
                factors.append((constant * u, v))
        for j in range(len(sums)):
            self.emit(3, f"_u{j} = np.empty(_n)")
            self.emit(3, f"_v{j} = np.empty(_n)")
        self.emit(3, "for _k in range(_n):")
        self.bind([f for pair_ in factors for f in pair_], 4)
        for j, (u, v) in enumerate(factors):
            self.emit(4, f"_u{j}[_k] = {self.printer.doprint(self.rename(u))}")
            self.emit(4, f"_v{j}[_k] = {self.printer.doprint(self.rename(v))}")
        for j, (r, _) in enumerate(sums):
            names = self.names(r)
            self.emit(3, "{r}, {r}_hi, {r}_error = _scaled_products(_u{j}, _v{j}, {p}_Pinv)".format(j=j, p=p, **names))

    def names(self, r: Reduction) -> dict:
        names = {"r": r.symbol.name}
        if r.kind in ("max", "min"):
            names["a"] = r.index.name
        if r.kind == "logsumexp_tail":
            names["m"], names["a"] = r.index[0].name, r.index[1].name
        if r.symbol in self.stashed:
            names["slot"] = self.stashed[r.symbol][0]
        return names


# How a reduction is computed in a pass over the row: lines before the loop, per element
# (the element's summand is _s), and after the loop.
LOOP_CODE = {
    "sum": {"start": ["{r} = 0.0", "{r}_error = 0.0"],
            "step": ["_x = {r} + _s", "_z = _x - {r}", "{r}_error += ({r} - (_x - _z)) + (_s - _z)", "{r} = _x"],
            "finish": ["{r}_hi = {r}", "if math.isfinite({r}):", "    {r} += {r}_error"]},
    # the same, the error part's own rounding errors kept too (stabilise_rows.error_tail)
    "sum_twofold": {"start": ["{r} = 0.0", "{r}_error = 0.0", "{r}_error_tail = 0.0"],
                    "step": ["_x = {r} + _s", "_z = _x - {r}", "_dx = ({r} - (_x - _z)) + (_s - _z)",
                             "_ex = {r}_error + _dx", "_zx = _ex - {r}_error",
                             "{r}_error_tail += ({r}_error - (_ex - _zx)) + (_dx - _zx)", "{r}_error = _ex",
                             "{r} = _x"],
                    "finish": ["{r}_hi = {r}", "if math.isfinite({r}):", "    {r} += {r}_error + {r}_error_tail"]},
    # the same, of products _s = a b, with their rounding errors in a part of their own (Dot2;
    # stabilise_rows.product_errors): R = hi + error + products' errors, hi + error as before
    "sum_products": {"start": ["{r} = 0.0", "{r}_error = 0.0", "{r}_products = 0.0"],
                     "step": ["_x = {r} + _s", "_z = _x - {r}", "{r}_error += ({r} - (_x - _z)) + (_s - _z)",
                              "{r} = _x", "{r}_products += _fma({a}, {b}, -_s)"],
                     "finish": ["{r}_hi = {r}", "if math.isfinite({r}):", "    {r} += {r}_error + {r}_products"]},
    "max": {"start": ["{r} = -math.inf", "{a} = 0"],
            "step": ["if _s > {r} or _k == 0:", "    {r} = _s", "    {a} = _k"],
            "finish": []},
    "min": {"start": ["{r} = math.inf", "{a} = 0"],
            "step": ["if _s < {r} or _k == 0:", "    {r} = _s", "    {a} = _k"],
            "finish": []},
    "max_keyed": {"start": ["{r} = -math.inf", "{a} = 0", "{r}_key = -math.inf"],
                  "step": ["if _s > {r} or _k == 0 or (_s == {r} and _key > {r}_key):",
                           "    {r} = _s", "    {a} = _k", "    {r}_key = _key"],
                  "finish": []},
    "min_keyed": {"start": ["{r} = math.inf", "{a} = 0", "{r}_key = math.inf"],
                  "step": ["if _s < {r} or _k == 0 or (_s == {r} and _key < {r}_key):",
                           "    {r} = _s", "    {a} = _k", "    {r}_key = _key"],
                  "finish": []},
    "logsumexp_tail": {"start": ["{r} = 0.0"],
                       "step": ["if _k != {a}:", "    {r} += math.exp(_s - {m})"],
                       "finish": ["{r} = math.log1p({r})"]},
    # the same, its terms exp(g - M) computed by a loop of their own into a scratch row (_s reads it)
    "logsumexp_tail_read": {"start": ["{r} = 0.0"],
                            "step": ["if _k != {a}:", "    {r} += _s"],
                            "finish": ["{r} = math.log1p({r})"]},
    # the same, keeping each exp(g - M) for the softmax weights E_k/(1 + S) of the element pass
    "logsumexp_tail_stashed": {"start": ["{r} = 0.0"],
                               "step": ["_x = math.exp(_s - {m})", "_stash[{slot}, _k] = _x",
                                        "if _k != {a}:", "    {r} += _x"],
                               "finish": ["{r}_inv = 1.0 / (1.0 + {r})", "{r}_rest = {r} * {r}_inv",
                                          "{r} = math.log1p({r})"]},
    "logsumexp_tail_stashed_read": {"start": ["{r} = 0.0"],
                                    "step": ["if _k != {a}:", "    {r} += _s"],
                                    "finish": ["{r}_inv = 1.0 / (1.0 + {r})", "{r}_rest = {r} * {r}_inv",
                                               "{r} = math.log1p({r})"]},
}


# A sum whose terms may cancel (stabilise_rows.exact_sums) is taken again, exactly, where its
# test holds (exact_rows.emit_exact_sum), as a double-double (hi, error). A sum of rounded terms
# sums their magnitudes too and tests |R| < threshold * sum_k |g_k|: where that does not hold its
# error is that of its rounded terms, k units of 2**-53 of sum_k |g_k| for k roundings in a term,
# at most 2**11 k 1.1e-16 of R (the triplet loss's terms take 3: 6.8e-13). A sum of products that
# keeps their rounding errors apart (Dot2) is accurate, but the forms that take an element's term
# out of its parts hi and error do not see the products' errors: it tests whether they reach
# threshold * R (x.y = -3.1e-7 from products of 1e10: cosine_embedding's Hessian diagonals had
# relative error 1), and only in the kernels whose forms read the parts.
EXACT_SUM = {
    "sum": {"start": ["{r}_magnitude = 0.0"], "step": ["{r}_magnitude += abs(_s)"],
            "test": "abs({r}) < {threshold} * {r}_magnitude", "threshold": 2.0 ** -11, "reset": []},
    "sum_products": {"start": [], "step": [], "test": "abs({r}_products) > {threshold} * abs({r})",
                     "threshold": 2.0 ** -40, "reset": ["{r}_products = 0.0"]},
}
EXACT_SUM_FINISH = ["if {test}:",
                    "    _hi, _lo = _exact{r}(_i, _n, _C, {arguments})",
                    "    if math.isfinite(_hi):",
                    "        {r}_hi, {r}_error, {r} = _hi, _lo, _hi + _lo"]


EXPONENTIALS = ("exp", "expm1", "exp_neg_abs", "expm1_abs", "log1p")


def _always_exponential(expr) -> bool:
    """Whether computing ``expr`` (in code_form) takes an exponential whichever branches of its
    Piecewises it takes (a Piecewise's first condition is always evaluated)."""
    if not isinstance(expr, sp.Basic) or expr.is_Atom:
        return False
    if type(expr).__name__ in EXPONENTIALS:
        return True
    if isinstance(expr, sp.Piecewise):
        return all(_always_exponential(value) for value, _ in expr.args) or _always_exponential(expr.args[0][1])
    return any(_always_exponential(a) for a in expr.args)


def _calls(expr: sp.Expr) -> set:
    """The exponentials and logarithms that ``expr`` takes."""
    return set(expr.atoms(sp.exp, expm1, sp.log, log1p))


def _folded(expr: sp.Expr) -> sp.Expr:
    """``expr`` at scales of 1: x 2**0 = x, g/1 = g (stabilise_rows.scaled_norms)."""
    return expr.replace(lambda e: isinstance(e, (two_scaled, in_scale)), lambda e: e.args[0])


def _hoist(expr: sp.Expr, is_element, hoisted: dict) -> sp.Expr:
    """Replace each largest row-level subexpression of an element expression by a name, so
    that it is computed once per row."""
    if not isinstance(expr, sp.Expr) or expr.is_Atom:
        return expr
    if isinstance(expr, sp.Mul) and len(expr.args) == 2 and expr.args[0].is_Number and expr.args[1].is_Atom:
        return expr  # -x, 2*x: cheaper than a name
    if isinstance(expr, sp.Pow) and expr.base.is_Atom and expr.exp.is_negative:
        return expr  # x/t stays a division, rounded as in the reduction passes (not x*(1/t))
    if not is_element(expr) and not isinstance(expr, sp.Piecewise):
        if expr not in hoisted:
            hoisted[expr] = sp.Symbol(f"_h{len(hoisted)}", real=True)
        return hoisted[expr]
    if isinstance(expr, sp.Piecewise):  # into its branches and conditions too (not Exprs themselves)
        return expr.func(*[(_hoist(value, is_element, hoisted), _hoist_condition(condition, is_element, hoisted))
                           for value, condition in expr.args])
    return expr.func(*[_hoist(a, is_element, hoisted) if isinstance(a, sp.Expr) else a for a in expr.args])


def _hoist_condition(condition, is_element, hoisted):
    """A Piecewise condition with the row-level parts of its comparisons named."""
    if isinstance(condition, sp.core.relational.Relational):
        return condition.func(_hoist(condition.lhs, is_element, hoisted), _hoist(condition.rhs, is_element, hoisted))
    if isinstance(condition, (sp.And, sp.Or, sp.Not, sp.ITE)):
        return condition.func(*[_hoist_condition(a, is_element, hoisted) for a in condition.args])
    return condition


def _guard_lines(spec) -> list[str]:
    """Conditions (printed) that the inputs of row _i lie in their domains."""
    conditions = []
    for i in spec.inputs:
        d = DOMAINS[i.domain]
        if i.domain == "class_index":
            continue  # checked by the runtime: an index outside [0, C) would read outside the row
        x = _element_name(sp.Symbol(i.name)) if i.axis else _row_name(sp.Symbol(i.name))
        if d.values:
            conditions.append((i, " or ".join(f"{x} == {v!r}" for v in d.values)))
            continue
        parts = []
        if d.low != float("-inf"):
            parts.append(f"{x} {'>=' if d.low_closed else '>'} {d.low!r}")
        if d.high != float("inf"):
            parts.append(f"{x} {'<=' if d.high_closed else '<'} {d.high!r}")
        if parts:
            conditions.append((i, " and ".join(parts)))
    return conditions


def tie_keys(derivation: RowDerivation) -> dict:
    """{max or min reduction: g}, for a summand g + c whose term c is the same for every element.
    The loop breaks ties of the rounded g + c by g (two elements equal once c is added, as
    s_j - s_y at s_y = -1e300, are not equal before), so the arg-max is the exact one more
    often. Taken from the summand as derived, before stabilisation splits it per element."""
    keys = {}
    for r in derivation.reductions:
        if r.kind in ("max", "min") and isinstance(r.summand, sp.Add):
            element = [t for t in r.summand.args if varies_along_row(t, derivation.element_symbols)]
            if len(element) < len(r.summand.args):
                keys[r.symbol] = sp.Add(*element)
    return keys


def _emit_guard(body, spec, outs: list[str], n_row_outputs: int, out_row: str = "_i"):
    """Set every output of row _i (at output row ``out_row``) to nan, and go to the next row, where
    an input of the row lies outside its domain (the first ``n_row_outputs`` outputs hold one value
    per row)."""
    guards = _guard_lines(spec)
    if not guards:
        return
    body.emit(2, "_inside = True")
    row_guards = [c for i, c in guards if not i.axis]
    for condition in row_guards:
        body.emit(2, f"if not ({condition}):")
        body.emit(3, "_inside = False")
    element_guards = [(i, c) for i, c in guards if i.axis]
    if element_guards:
        body.emit(2, "for _k in range(_n):")
        body.bind([spec.symbols[i.name] for i, _ in element_guards], 3)
        body.emit(3, f"if not ({' and '.join(f'({c})' for _, c in element_guards)}):")
        body.emit(4, "_inside = False")
    body.emit(2, "if not _inside:")
    for j, out in enumerate(outs):
        body.emit(3, f"{out}[{out_row}] = math.nan" if j < n_row_outputs else f"{out}[{out_row}, ...] = math.nan")
    body.emit(3, "continue")


def _with_scaled(derivation: RowDerivation, build) -> dict:
    """The kernel ``build(False)`` (its fast row function); where the loss has scaled norms and
    that row function hands rows out of range on, with ``build(True)``'s row function for them
    (``scaled_lines``, templates/row_module.py.j2)."""
    fast = build(False)
    if not derivation.scaled or not any(SCALED_ROW in line for line in fast["lines"]):
        return fast
    return {**fast, "scaled_lines": build(True)["lines"]}


# the docstring of a full Hessian's recomputation in double-word (lossgen/double_word.py)
DOUBLE_WORD_DOC = ("The entries of row _i whose outer products the kernel's test found cancelling, again in\n"
                   "    double-word arithmetic from the kernel's own forms (lossgen/double_word.py).")
# the docstring of a recomputation with a first try (exact_rows.FIRST_TRY)
FIRST_TRY_DOC = ("The outputs of row _i that are quotients over row sums, where the kernel's cancellation test\n"
                 "    flagged the row: with _xexact false from Sum2's row sums, returning False where a value's\n"
                 "    error bound is not small enough; else from exact ones, each output's monomials as one\n"
                 "    expansion (lossgen/exact_rows.py).")


def _kernel(derivation: RowDerivation, name: str, row_outputs, element_outputs, printer, keys,
            fallbacks=None, arguments=(), shared=()) -> dict:
    """One kernel: ``row_outputs`` are row expressions written to out[_i], ``element_outputs``
    element expressions written to out[_i, _k]; ``fallbacks``: {index in element_outputs:
    exact_rows.Fallback}, the guarded exact recomputation of those outputs; ``shared``:
    ((quantity, first index in element_outputs, count), ...), the quantities whose kernel's
    recomputation this one calls instead of its own (numba compiles each once: it is most of a
    fallback's compile time). Where the loss has scaled norms, the kernel's row function for the
    rows out of range as well (:func:`_with_scaled`)."""
    return _with_scaled(derivation, lambda scaled: _kernel_lines(
        derivation, name, row_outputs, element_outputs, printer, keys, fallbacks, arguments, scaled, shared))


def _kernel_lines(derivation: RowDerivation, name: str, row_outputs, element_outputs, printer, keys,
                  fallbacks, arguments, scaled: bool, shared=()) -> dict:
    """:func:`_kernel`'s fast row function, or (``scaled``) its twin for the scaled norms."""
    body = _Body(derivation, printer, keys, scaled)
    spec = derivation.spec
    fallbacks = fallbacks or {}
    row_outputs = [body.shifts(e) for e in row_outputs]
    element_outputs = body.stash_softmax([body.shifts(e) for e in element_outputs])
    outs = [f"_out{j}" for j in range(len(row_outputs) + len(element_outputs))]
    body.bind_row()
    _emit_guard(body, spec, outs, len(row_outputs))

    n_outputs = len(element_outputs)
    tests = [e for f in fallbacks.values() for e in (f.numerator, f.bound)]
    element_outputs, hoisted = body.hoist(element_outputs + tests)
    element_outputs, tests = element_outputs[:n_outputs], element_outputs[n_outputs:]
    if fallbacks:
        printer.helpers_used.update(("xexact", "fma"))
    row_values = list(row_outputs) + list(hoisted)
    vector = body.plan_vector(row_values, element_outputs)
    body.reductions_pass(row_values + element_outputs + tests)
    body.emit(2, ROW_WEIGHT)

    def emit_values(fold):
        values, elements, checks = fold(row_values), fold(element_outputs), fold(tests)
        if values:
            printed = body.cse(values, 2)
            for j, value in enumerate(printed[:len(row_outputs)]):
                body.emit(2, f"{outs[j]}[_i] = _w * ({value})")
            for symbol, value in zip(hoisted.values(), printed[len(row_outputs):]):
                body.emit(2, f"{symbol} = {value}")
        if elements:
            if fallbacks:
                body.emit(2, "_xflag = False")
            body.emit(2, "for _k in range(_n):")
            body.bind(elements + checks, 3)
            body.bind_weights(elements, 3)
            printed = body.cse(elements, 3, vector=vector)
            for out, value in zip(outs[len(row_outputs):], printed):
                body.emit(3, f"{out}[_i, _k] = _w * ({value})")
            # the cancellation test of each output with a fallback, OR-ed into the row's flag (no
            # branch); printed apart, so that the outputs' own code is what it was without it
            flags = body.cse(checks, 3, vector=vector) if checks else []
            for n in range(len(fallbacks)):
                body.emit(3, f"_xflag |= {fires(flags[2 * n], flags[2 * n + 1])}")

    body.in_scales(emit_values)
    exact = []
    if fallbacks:
        # the recomputation is a function of its own, called only where the flag is set, so that
        # the row function stays as small as without it
        body.emit(2, "if _xflag:")

        def emit_call(quantity, call):
            # the first try's sums (exact_rows.FIRST_TRY), the exact ones where it declines
            # np.bool_: a run-time flag, where a literal True or False would compile the function twice
            body.emit(3, f"if not _{quantity}_exact({call}, np.bool_(False)):")
            body.emit(4, f"_{quantity}_exact({call}, np.bool_(True))")

        if shared:
            for quantity, first, count in shared:
                start = len(row_outputs) + first
                call = ", ".join(["_i", "_n", "_C", *arguments, *outs[start:start + count], "_w"])
                emit_call(quantity, call)
        else:
            call = ", ".join(["_i", "_n", "_C", *arguments, *outs, "_w"])
            emit_call(name, call)
            exact_body = _Body(derivation, printer, keys)
            emit_fallback(exact_body, fallbacks, {j: outs[len(row_outputs) + j] for j in fallbacks})
            exact = exact_body.lines
    kernel = {"name": name, "outs": outs, "lines": body.lines, "stash": body.slots, "exact": exact,
              "doc": f"{name.replace('_', ', ')} of each row, times _weight[i] when given."}
    if exact:
        kernel.update(exact_arguments=", _w, _xexact", exact_doc=FIRST_TRY_DOC)
    return kernel


def _indices(block, derivation) -> list:
    """The indices that onehot singles out in a Hessian block's outer products, as branches of
    the element's expressions (not those inside a value, stabilise_rows.value_indices)."""
    nodes = set().union(*(e.atoms(onehot) for pq in block.outer for e in pq)) if block.outer else set()
    return sorted({n.args[0] for n in nodes} - value_indices(derivation), key=sp.default_sort_key)


def _block_pairs(derivation: RowDerivation) -> list[tuple[int, int]]:
    """The Hessian's blocks (i, j), in row-major order of the predictions."""
    k = len(derivation.spec.predictions)
    return [(i, j) for i in range(k) for j in range(k)]


def _block_kernel(derivation: RowDerivation, printer, product: bool, keys, fallbacks=None, arguments=(),
                  full=None) -> dict:
    """:func:`_block_kernel_lines`, with its twin for the scaled norms (:func:`_with_scaled`)."""
    return _with_scaled(derivation, lambda scaled: _block_kernel_lines(derivation, printer, product, keys, scaled,
                                                                       fallbacks, arguments, full))


def _block_kernel_lines(derivation: RowDerivation, printer, product: bool, keys, scaled: bool,
                        fallbacks=None, arguments=(), full=None) -> dict:
    """The Hessian entry by entry: d2 loss / d x_j d x'_l = delta_jl D(j) + sum P(j) Q(l).

    Without ``product``, every (C, C) block is written. With it, the Hessian times the
    directions v (one per prediction): sum_l H_jl v_l, the diagonal entry its own expression (D
    + P Q would cancel: softmax - softmax**2). A block of M outer products is summed in O(C M)
    per row, D(j) v_j + sum_m P_m(j) sum_{l != j} Q_m(l) v_l, in double-word
    (:func:`_emit_low_rank_product`, a onehot's index too); a block with several indices that
    onehot singles out (none in the catalog) entry by entry, in O(C**2). The matrix is never
    formed.

    The full Hessian's row function writes output row ``_o`` (the launchers pass _i), so that
    the product's recomputation can write a row of blocks of its own.

    ``fallbacks``: {block: (exact_rows.Fallback of its diagonal, exact_rows.PairFallback of its
    other entries), or (None, double_word.DoubleWordBlock)}, blocks in row-major order of the
    predictions; each entry's cancellation test is OR-ed into the row's flag of its block, and a
    flagged row is recomputed exactly (lossgen/exact_rows.py) or, for a double-word block (its
    entries tested on their own outer products, its diagonal not), in double-word
    (lossgen/double_word.py). The product's flag is per row of blocks (where each of them has a
    plan), OR-ed with a test of its sum; a flagged row is recomputed as the full Hessian's row
    (``full``: that kernel, whose row function recomputes its flagged entries) times the
    directions, so that the recomputation is compiled once for both kernels."""
    body = _Body(derivation, printer, keys, scaled)
    k = len(derivation.spec.predictions)
    pairs = _block_pairs(derivation)
    blocks = [derivation.blocks[p] for p in pairs]
    fallbacks = fallbacks or {}
    # the product's row j of prediction r sums the blocks (r, c): recomputed where each has a plan
    row_blocks = {r: [b for b, (i, _) in enumerate(pairs) if i == r] for r in range(k)}
    if product:
        fallbacks = {b: f for b, f in fallbacks.items() if all(c in fallbacks for c in row_blocks[pairs[b][0]])}
    # the flag of a product's row j: in its row's first block's flag row (``heads``, one per flag)
    first_of = {b: row_blocks[pairs[b][0]][0] if product else b for b in fallbacks}
    heads = list(dict.fromkeys(first_of.values()))
    # on a block's diagonal: one stabilised expression (hess, or derivation.cross off the
    # block diagonal), else D + sum P Q
    own = [i == j or (i, j) in derivation.cross for i, j in pairs]
    diagonals = [body.shifts(derivation.hess[i] if i == j else derivation.cross.get((i, j), b.diagonal))
                 for (i, j), b in zip(pairs, blocks)]
    factors = [body.shifts(e) for b in blocks for pq in b.outer for e in pq]
    # the tests of each block with a fallback: the diagonal's per element, the other entries' as
    # outer products (scratch rows)
    diagonal_tests, pair_tests = [], {}
    # the blocks recomputed in double-word (lossgen/double_word.py): their entries tested on the
    # kernels' own outer products, their diagonals (one expression each) not at all
    double_word = {b for b, (_, pair) in fallbacks.items() if isinstance(pair, DoubleWordBlock)}
    for b, (diagonal, pair) in fallbacks.items():
        if b in double_word:
            printer.helpers_used.update(("double_word", "fma"))
            numerator, bound = pair.test(product)
            pair_tests[b] = [[body.shifts(e) for pq in products for e in pq]
                             for products in ([] if product else numerator, bound)]
            continue
        printer.helpers_used.update(("xexact", "fma"))
        diagonal_tests += [diagonal.numerator, diagonal.bound]
        # the product's test is per row of the block (its sum's error against sum_l |H_jl v_l|):
        # the bound alone, in the entries' units; the full block's is per entry
        numerator, bound = pair.test_outer(per_entry=product)
        pair_tests[b] = [[e for pq in products for e in pq] for products in ([] if product else numerator, bound)]
        if not product:  # the bound in the entry's units, per row: 1/|denominator| in a scratch row,
            # and 1/denominator, the estimate's (exact_rows.disagrees)
            pair_tests[b] += [[pair.entry_scale()], [pair.estimate_scale()]]
    n_scratch = len(diagonals) + len(factors)
    tests = [e for b in fallbacks for t in pair_tests[b] for e in t]
    element, hoisted = body.hoist(diagonals + factors + tests + diagonal_tests)
    element, diagonal_tests = element[:len(element) - len(diagonal_tests)], element[len(element) - len(diagonal_tests):]
    # the tests' factors take a scratch row only where no earlier row holds the same value
    slot = list(range(n_scratch))
    unique = element[:n_scratch]
    for e in element[n_scratch:]:
        if e not in unique:
            unique.append(e)
        slot.append(unique.index(e))
    element = unique
    outs = [f"_out{b}" for b in range(k if product else len(pairs))]
    out_row = "_i" if product else "_o"
    body.bind_row()
    _emit_guard(body, derivation.spec, outs, 0, out_row)
    vector = body.plan_vector(list(hoisted), element)
    body.reductions_pass(list(hoisted) + element + diagonal_tests)
    body.emit(2, ROW_WEIGHT)
    # with a fallback, a row more per block: each element's flag (its diagonal entry's test, then
    # any entry of its row of the block), which the recomputation reads
    flags = {b: len(element) + n for n, b in enumerate(fallbacks)}
    scratch_rows = max(len(element), 1) + len(fallbacks)
    # the product's: a row more per flag, the rows j whose sum is tested entry by entry
    candidates = {first: scratch_rows + n for n, first in enumerate(heads)} if product else {}

    def emit_values(fold):
        if hoisted:
            for symbol, value in zip(hoisted.values(), body.cse(fold(list(hoisted)), 2)):
                body.emit(2, f"{symbol} = {value}")
        body.emit(2, f"_scratch = np.empty(({scratch_rows + len(candidates)}, _n))")
        elements, checks = fold(element), fold(diagonal_tests)
        for b in heads:
            body.emit(2, f"_xflag{b} = False")
        body.emit(2, "for _k in range(_n):")
        body.bind(elements + checks, 3)
        for j, value in enumerate(body.cse(elements, 3, vector=vector)):
            body.emit(3, f"_scratch[{j}, _k] = {value}")
        printed = body.cse(checks, 3, vector=vector) if checks else []
        for b in (b for b in fallbacks if b in double_word):
            body.emit(3, f"_scratch[{flags[b]}, _k] = 0.0")
        for n, b in enumerate(b for b in fallbacks if b not in double_word):
            numerator, bound = printed[2 * n], printed[2 * n + 1]
            body.emit(3, f"_scratch[{flags[b]}, _k] = 1.0 if {fires(numerator, bound)} else 0.0")

    body.in_scales(emit_values)
    directions = [d.name for d in derivation.directions]
    starts = [len(diagonals) + 2 * sum(len(b.outer) for b in blocks[:n]) for n in range(len(blocks))]
    # each block's test as pairs of scratch rows (P(j), Q(l)): its numerator's (none in the
    # product's test) and its bound's outer products, then (the full block's) the entry's scale
    test_rows, at = {}, n_scratch
    for b in fallbacks:
        test_rows[b] = []
        for part in pair_tests[b][:2]:
            test_rows[b].append([(slot[at + m], slot[at + m + 1]) for m in range(0, len(part), 2)])
            at += len(part)
        if not product and b not in double_word:
            test_rows[b] += [slot[at], slot[at + 1]]
            at += 2

    def outer_sum(first: int, count: int, j: str, l: str) -> str:
        """sum P(j) Q(l) of a block's ``count`` outer products, from their scratch rows."""
        return " + ".join(f"_scratch[{first + 2 * m}, {j}] * _scratch[{first + 2 * m + 1}, {l}]"
                          for m in range(count)) or "0.0"

    def outer_rows(rows) -> str:
        """sum P(j) Q(l) over pairs of scratch rows."""
        return " + ".join(f"_scratch[{p}, _j] * _scratch[{q}, _l]" for p, q in rows)

    def index_code(index) -> str:
        return body.printer.doprint(body.rename(index))

    def entry_lines(b: int) -> list[str]:
        """Lines setting _h to entry (_j, _l) of block b."""
        block = blocks[b]
        total = outer_sum(starts[b], len(block.outer), "_j", "_l")
        if special(b):
            # a prediction's own block is symmetric: an entry (j, l) with l at an index that
            # onehot singles out (the true class) and j not is entry (l, j), whose P(l) was
            # stabilised as one expression at that index (the own term's 1 - p_y, exact)
            at_l = " or ".join(f"_l == {index_code(i)}" for i in special(b))
            at_j = " or ".join(f"_j == {index_code(i)}" for i in special(b))
            swapped = outer_sum(starts[b], len(block.outer), "_l", "_j")
            return ["if _j == _l:", f"{INDENT}_h = _scratch[{b}, _j]", f"elif ({at_l}) and not ({at_j}):",
                    f"{INDENT}_h = {swapped}", "else:", f"{INDENT}_h = {total}"]
        if own[b]:
            return [f"_h = _scratch[{b}, _j] if _j == _l else {total}"]
        return [f"_h = {total}", "if _j == _l:", f"{INDENT}_h += _scratch[{b}, _j]"]

    def special(b: int) -> list:
        """The indices that a prediction's own block b singles out (none off the block diagonal)."""
        (row, column), block = pairs[b], blocks[b]
        return _indices(block, derivation) if row == column else []

    # the product's blocks in O(C M): all but those with several indices singled out
    low_rank = [b for b in range(len(pairs)) if product and len(special(b)) <= 1]
    assert set(fallbacks) <= set(low_rank) or not product, "a block with a fallback has no onehot branch"
    if not product:
        body.emit(2, "for _j in range(_n):")
    elif low_rank:
        _emit_low_rank_product(body, {b: [(starts[b] + 2 * m, starts[b] + 2 * m + 1)
                                          for m in range(len(blocks[b].outer))] for b in low_rank},
                               {b: f"_scratch[{b}, _j]" if own[b] else
                                f"_scratch[{b}, _j] + {outer_sum(starts[b], len(blocks[b].outer), '_j', '_j')}"
                                for b in low_rank},
                               {b: (outs[pairs[b][0]], directions[pairs[b][1]]) for b in range(len(pairs))},
                               {first: [b for b in fallbacks if first_of[b] == first] for first in heads},
                               {b: rows for b, (_, rows) in test_rows.items()}, flags, entry_lines,
                               {b: index_code(special(b)[0]) for b in low_rank if special(b)}, candidates)
    for first in heads if not product else ():
        members = [b for b in fallbacks if first_of[b] == first]
        body.emit(3, f"_xj{first} = " + " | ".join(f"(_scratch[{flags[b]}, _j] != 0.0)" for b in members))
    entry_blocks = [b for b in range(len(pairs)) if b not in low_rank]
    if entry_blocks:
        if product:  # the blocks with several indices singled out (no fallback), entry by entry
            body.emit(2, "for _j in range(_n):")
            for out in outs if not low_rank else ():
                body.emit(3, f"{out}[_i, _j] = 0.0")
        body.emit(3, "for _l in range(_n):")
    for b in entry_blocks:
        row, column = pairs[b]
        for line in entry_lines(b):
            body.emit(4, line)
        if product:
            body.emit(4, f"{outs[row]}[_i, _j] += _w * _h * {directions[column]}[_i, _l]")
            continue
        body.emit(4, f"{outs[b]}[_o, _j, _l] = _w * _h")
        if b in double_word:  # the entry is the test's numerator, its bound in the entry's units
            body.emit(4, f"_xbl = {outer_rows(test_rows[b][1])}")
            body.emit(4, f"_xj{b} |= (_j != _l) & ({fires('_h', '_xbl')})")
        elif b in fallbacks:
            numerator, bound, scale, estimate = test_rows[b]
            body.emit(4, f"_xbl = {outer_rows(bound)}")
            body.emit(4, f"_xnl = {outer_rows(numerator)}")
            body.emit(4, f"_xj{b} |= (_j != _l) & ({fires('_xnl', '_xbl', f'_xbl * _scratch[{scale}, _j]')}"
                         f" | {disagrees('_h', f'_xnl * _scratch[{estimate}, _j]')})")
    for b in heads if not product else ():  # the rows of the block that the recomputation reads
        body.emit(3, f"_scratch[{flags[b]}, _j] = 1.0 if _xj{b} else 0.0")
        body.emit(3, f"_xflag{b} |= _xj{b}")
    exact = []
    if fallbacks:
        body.emit(2, "if " + " or ".join(f"_xflag{b}" for b in heads) + ":")
        if product:
            body.emit(3, f"_hvp_exact({', '.join(['_i', '_n', '_C', *arguments, *directions, *outs])}, _w)")
            exact = _product_recompute_lines(pairs, outs, directions, arguments, full)
            # the rows whose diagonal entry alone was flagged: none where every block is recomputed
            # in double-word (its diagonal is not tested)
            if set(fallbacks) - double_word:
                body.emit(2, "elif " + " or ".join(f"_xdiagonal{b}" for b in heads) + ":")
                members = {first: [c for c in range(len(pairs)) if pairs[c][0] == pairs[first][0]] for first in heads}
                for line in _diagonal_recompute_lines(pairs, outs, directions, arguments, full, members,
                                                      {first: [flags[b] for b in fallbacks if first_of[b] == first]
                                                       for first in heads}, flags, entry_lines):
                    body.emit(3, line)
        else:
            body.emit(3, f"_hess_full_exact({', '.join(['_i', '_o', '_n', '_C', *arguments, *outs])}"
                         ", _w, _scratch)")
            exact_body = _Body(derivation, printer, keys)
            # one function for every block: the row sums' expansions and the region set up once
            # (apart, cosine_embedding's four blocks compiled in as long: 36 s, 34 s together)
            planned = [BlockRecompute(diagonal, pair, outs[b], flags[b])
                       for b, (diagonal, pair) in fallbacks.items() if b not in double_word]
            if planned:
                emit_block_fallback(exact_body, planned)
            if double_word:
                exact_body.lines += _double_word_lines(derivation, printer, keys, arguments, [
                    DoubleWordRecompute(fallbacks[b][1], outs[b], flags[b], *map(outer_rows, test_rows[b]))
                    for b in sorted(double_word)])
            exact = exact_body.lines
    if product:  # quadratic: O(C**2) work per row, where a block is summed entry by entry
        how = (" (never stored), in O(C) per block" if not entry_blocks else
               ", entry by entry (never stored)" if not low_rank else
               " (never stored; blocks with several indices singled out entry by entry, the others in O(C))")
        return {"name": "hvp", "outs": outs, "lines": body.lines, "stash": body.slots, "exact": exact,
                "quadratic": bool(entry_blocks),
                "exact_arguments": ", _w",
                "exact_doc": "Row _i, which the product's test flagged: the full Hessian's row (its entries recomputed\n"
                             "    exactly where their tests fire) times the directions.",
                "doc": f"The Hessian of each row times the directions{how}, times _weight[i] when given."}
    return {"name": "hess_full", "outs": outs, "lines": body.lines, "stash": body.slots, "exact": exact, "quadratic": True,
            "exact_arguments": ", _w, _scratch", "out_row": True,
            "exact_doc": DOUBLE_WORD_DOC if double_word and len(double_word) == len(fallbacks) else None,
            "flags": flags, "scratch_rows": scratch_rows,
            "doc": "Every (C, C) block of the Hessian of each row, blocks in row-major order of "
                   "the predictions, times _weight[i] when given."}


def _emit_low_rank_product(body, terms: dict, diagonals: dict, targets: dict, heads: dict, bounds: dict,
                           flags: dict, entry_lines, singled: dict, candidates: dict):
    """The Hessian-vector product's blocks (at most one index singled out) in O(C M) per row:
    sum_l H_jl v_l = D(j) v_j + sum_m P_m(j) T_m(j), T_m(j) = sum_{l != j} Q_m(l) v_l.

    Each T_m: the row's terms Q_m(l) v_l split exactly by fused multiply-adds and summed by Sum2
    without the largest, t_m, which is added back, and the own term taken out, in double-word (with
    t_m in the sum, a softmax's p_j = 1 drowned the others' terms of 1e-59); P_m(j) T_m(j) split
    again and summed over m in double-word. The value's error is then a few ulps of its own
    magnitude plus u**2 sum_m |P_m(j)| sum_l |Q_m(l) v_l|: the factors' own errors, the same as
    the entries' (each entry's P_m(j) Q_m(l) holds them), dominate.

    ``terms``: {block: [(scratch row of P_m, of Q_m), ...]}; ``diagonals``: {block: code of H_jj};
    ``targets``: {block: (output, direction)}; ``heads``: {flag: blocks with a fallback whose
    test it takes} (the rows of blocks of one prediction); ``bounds``: {block: [(P, Q) rows of
    its test's bound]}; ``flags``: {block: scratch row of its elements' diagonal flags};
    ``entry_lines(block)``: lines setting _h to entry (_j, _l); ``singled``: {block: the index
    that onehot singles out in it, s}, whose entries (j, s), j != s, are P(s) Q(j) (see
    ``entry_lines``): the row sums leave Q_m(s) v_s out (no entry forms Q_m(s); focal loss's is
    inf where 1 - p_y underflows), and sum_m P_m(s) Q_m(j) v_s is added. ``candidates``: {flag:
    the scratch row that marks the rows j whose sum is taken entry by entry}.

    A fallback's test (|H v|_j = sum_l |H_jl v_l| against sum_l bound_jl |v_l|) costs O(M) per
    j, not O(C): its bound is a sum of outer products, sum_m Bp_m(j) sum_l Bq_m(l) |v_l|, and |H v|_j is
    at least |H_jj v_j| plus the larger of |sum_{l != j} H_jl v_l| and |sum_{l != j} H_jl |v_l||
    (the signs of random directions cancel the first by sqrt(C), not the second: on uniform
    rows of the overlap losses at C = 1024, the median of the second is 0.9-1.0 of |H v|_j), the
    latter less a bound of its rounding error; only a row j failing that sums |H v|_j entry by
    entry, in a loop after the rows' products. A row j whose sum fails the test sets _xflag (the row is recomputed as the full
    Hessian's row times v); one whose diagonal entry's test fires, and no other, sets _xdiagonal
    (its row of blocks alone is recomputed: :func:`_diagonal_recompute_lines`)."""
    emit = body.emit
    pairs = [(b, m) for b, rows in terms.items() for m in range(len(rows))]

    def term(b, m, k):  # Q_m(k) v_k of block b
        return f"_scratch[{terms[b][m][1]}, {k}]", f"{targets[b][1]}[_i, {k}]"

    def add(b, m, k, hi, lo, negative=False):  # (hi, lo) += Q_m(k) v_k (or -=), exactly split
        return split_product_lines(*term(b, m, k)) + add_split_lines(hi, lo, negative)

    def skip(b):  # a singled-out index's terms are never formed (its Q_m(s) may be inf: focal)
        return f" and _k != {singled[b]}" if b in singled else ""

    if pairs:
        body.printer.helpers_used.add("fma")
        for b, m in pairs:
            emit(2, f"_qt{b}_{m} = -1.0")
            emit(2, f"_qm{b}_{m} = 0")
        emit(2, "for _k in range(_n):")
        for b, m in pairs:
            emit(3, f"_t = abs({'*'.join(term(b, m, '_k'))})")
            emit(3, f"if _t > _qt{b}_{m}{skip(b)}:")
            emit(4, f"_qt{b}_{m} = _t")
            emit(4, f"_qm{b}_{m} = _k")
    sums = [(b, n) for members in heads.values() for b in members for n in range(len(bounds[b]))]
    for b, m in pairs:
        emit(2, f"_qh{b}_{m} = 0.0")
        emit(2, f"_ql{b}_{m} = 0.0")
    # the tested blocks' sum_l Q_m(l) |v_l| (compensated) and sum_l |Q_m(l) v_l|
    tested = [(b, m) for b, m in pairs if any(b in members for members in heads.values())]
    # a bound's factor Q(l) that is a term's own Q_m (double_word: the bound is t |P_m| |Q_m|)
    # reads sum_l |Q_m(l) v_l|, which the tests sum anyway, and |Q_m(l)| entry by entry
    own_rows = {b: {q: m for m, (_, q) in enumerate(rows)} for b, rows in terms.items()}
    shared = {(b, n): f"_qb{b}_{own_rows[b][bounds[b][n][1]]}" for b, n in sums
              if bounds[b][n][1] in own_rows.get(b, {}) and (b, own_rows[b][bounds[b][n][1]]) in tested}
    bound_sum = {(b, n): shared.get((b, n), f"_xu{b}_{n}") for b, n in sums}
    sums = [(b, n) for b, n in sums if (b, n) not in shared]
    for b, n in sums:
        emit(2, f"_xu{b}_{n} = 0.0")
    for b, m in tested:
        for line in LOOP_CODE["sum"]["start"]:
            emit(2, line.format(r=f"_qa{b}_{m}"))
        emit(2, f"_qb{b}_{m} = 0.0")
    if pairs or sums:
        emit(2, "for _k in range(_n):")
    for b, m in pairs:
        emit(3, f"if _k != _qm{b}_{m}{skip(b)}:")
        for line in add(b, m, "_k", f"_qh{b}_{m}", f"_ql{b}_{m}"):
            emit(4, line)
    for b, n in sums:
        emit(3, f"_xu{b}_{n} += _scratch[{bounds[b][n][1]}, _k] * abs({targets[b][1]}[_i, _k])")
    for b, m in tested:
        emit(3, f"_s = _scratch[{terms[b][m][1]}, _k] * abs({targets[b][1]}[_i, _k])")
        for line in LOOP_CODE["sum"]["step"]:
            emit(3, line.format(r=f"_qa{b}_{m}"))
        emit(3, f"_qb{b}_{m} += abs(_s)")
    for first in heads:
        emit(2, f"_xdiagonal{first} = False")
    emit(2, "for _j in range(_n):")
    for out in dict.fromkeys(out for out, _ in targets.values()):
        emit(3, f"{out}[_i, _j] = 0.0")
    for first in heads:
        emit(3, f"_xlb{first} = 0.0")
    for b, rows in terms.items():
        emit(3, "_hv_h = 0.0")
        emit(3, "_hv_l = 0.0")
        s = singled.get(b)
        if s is not None:
            emit(3, f"_not_s = _j != {s}")  # entry (j, s) is P(s) Q(j)
        for m, (p, _) in enumerate(rows):
            largest = f"_qm{b}_{m}"
            emit(3, f"_th, _tl = _qh{b}_{m}, _ql{b}_{m}")
            if s is None:
                emit(3, f"if _j != {largest}:")
                for line in add(b, m, largest, "_th", "_tl") + add(b, m, "_j", "_th", "_tl", negative=True):
                    emit(4, line)
            else:  # the sum leaves s out: the largest added back, and j's taken out unless j = s
                emit(3, f"if _j != {largest}:")
                for line in add(b, m, largest, "_th", "_tl"):
                    emit(4, line)
                emit(4, "if _not_s:")
                for line in add(b, m, "_j", "_th", "_tl", negative=True):
                    emit(5, line)
            emit(3, f"_ph = _scratch[{p}, _j] * _th")
            emit(3, f"_pl = _fma(_scratch[{p}, _j], _th, -_ph) + _scratch[{p}, _j] * _tl")
            for line in add_split_lines("_hv_h", "_hv_l"):
                emit(3, line)
        out, direction = targets[b]
        if s is not None:
            emit(3, "if _not_s:")
            swapped = " + ".join(f"_scratch[{p}, {s}] * _scratch[{q}, _j]" for p, q in rows)
            for line in split_product_lines(f"({swapped})", f"{direction}[_i, {s}]") + \
                    add_split_lines("_hv_h", "_hv_l"):
                emit(4, line)
        emit(3, f"_hd = ({diagonals[b]}) * {direction}[_i, _j]")
        emit(3, "_hv = _hv_h + _hv_l")
        emit(3, f"{out}[_i, _j] += _w * (_hd + _hv)")
        for first, members in heads.items():
            if b not in members:
                continue
            # sum_{l != j} H_jl |v_l| too, which the signs of v do not cancel, less its error
            emit(3, "_lb = 0.0")
            emit(3, "_mg = 0.0")
            emit(3, f"_av = abs({direction}[_i, _j])")
            for m, (p, q) in enumerate(rows):
                emit(3, f"_lb += _scratch[{p}, _j] * ((_qa{b}_{m} + _qa{b}_{m}_error) - _scratch[{q}, _j] * _av)")
                emit(3, f"_mg += abs(_scratch[{p}, _j]) * (_qb{b}_{m} + abs(_scratch[{q}, _j]) * _av)")
            emit(3, f"_xlb{first} += max(abs(_hv), abs(_lb) - {4 * (len(rows) + 2)} * 1.1102230246251565e-16 * _mg)"
                    " + abs(_hd)")
    for first, members in heads.items():
        emit(3, f"_xj{first} = " + " | ".join(f"(_scratch[{flags[b]}, _j] != 0.0)" for b in members))
        emit(3, f"_xsb{first} = " + (" + ".join(f"_scratch[{bounds[b][n][0]}, _j] * {bound_sum[b, n]}"
                                                for b in members for n in range(len(bounds[b]))) or "0.0"))
        # the rows j to sum |H v|_j entry by entry, after this loop: inside it, the O(C) loop slowed
        # the rows that never take it (global SSIM's product 1.6 times as long at 20000 x 16)
        emit(3, f"_scratch[{candidates[first]}, _j] = 1.0 if {fires(f'_xlb{first}', f'_xsb{first}')} else 0.0")
        emit(3, f"_xdiagonal{first} |= _xj{first}")
    for first, members in heads.items():
        emit(2, "for _j in range(_n):")
        emit(3, f"if _scratch[{candidates[first]}, _j] == 0.0:")
        emit(4, "continue")
        emit(3, f"_xsh{first} = 0.0")
        emit(3, f"_xsb{first} = 0.0")
        emit(3, "for _l in range(_n):")
        for b in members:
            direction = targets[b][1]
            for line in entry_lines(b):
                emit(4, line)
            bound = " + ".join(f"_scratch[{p}, _j] * " + (f"abs(_scratch[{q}, _l])" if q in own_rows.get(b, {})
                                                               else f"_scratch[{q}, _l]") for p, q in bounds[b])
            emit(4, f"_xsh{first} += abs(_h * {direction}[_i, _l])")
            emit(4, f"_xsb{first} += ({bound}) * abs({direction}[_i, _l])")
        emit(3, f"_xflag{first} |= {fires(f'_xsh{first}', f'_xsb{first}')}")


def _diagonal_recompute_lines(pairs, outs, directions, arguments, full: dict, members: dict, row_flags: dict,
                              flags: dict, entry_lines) -> list[str]:
    """The product's recomputation of the rows j whose diagonal entry's test fired (and no row
    sum's): their rows of blocks entry by entry (``entry_lines``, times _w) into blocks of their
    own, the full Hessian's recomputation (_hess_full_exact, which reads its flags and recomputes
    the entries whose tests fire) on those rows, and their products summed again: O(C) per such
    row j, where the full row's recomputation is O(C**2).

    ``members``: {flag: the blocks of its row of blocks}; ``row_flags``: {flag: the scratch rows
    of its elements' flags}; ``flags``: {block: its scratch row of flags}."""
    lines = [f"_blocks = np.empty(({len(pairs)}, 1, _n, _n), {outs[0]}.dtype)",
             f"_fscratch = np.zeros(({full['scratch_rows']}, _n))"]
    for b, row in flags.items():  # the full Hessian's flags, where the product has them
        if b in full["flags"]:
            lines += ["for _k in range(_n):", f"{INDENT}_fscratch[{full['flags'][b]}, _k] = _scratch[{row}, _k]"]
    flagged = {first: " or ".join(f"_scratch[{row}, _j] != 0.0" for row in rows) for first, rows in row_flags.items()}
    lines.append("for _j in range(_n):")
    for first, blocks in members.items():
        lines.append(f"{INDENT}if {flagged[first]}:")
        lines.append(f"{INDENT * 2}for _l in range(_n):")
        for b in blocks:
            lines += [INDENT * 3 + line for line in entry_lines(b)]
            lines.append(f"{INDENT * 3}_blocks[{b}, 0, _j, _l] = _w * _h")
    call = ["_i", "np.int64(0)", "_n", "_C", *arguments, *(f"_blocks[{b}]" for b in range(len(pairs))),
            "_w", "_fscratch"]
    lines.append(f"_hess_full_exact({', '.join(call)})")
    lines.append("for _j in range(_n):")
    for first, blocks in members.items():
        lines.append(f"{INDENT}if {flagged[first]}:")
        lines.append(f"{INDENT * 2}_s = 0.0")
        lines.append(f"{INDENT * 2}for _l in range(_n):")
        for b in blocks:
            lines.append(f"{INDENT * 3}_s += _blocks[{b}, 0, _j, _l] * {directions[pairs[b][1]]}[_i, _l]")
        lines.append(f"{INDENT * 2}{outs[pairs[first][0]]}[_i, _j] = _s")
    return lines


def _product_recompute_lines(pairs, outs, directions, arguments, full: dict) -> list[str]:
    """The body of the product's recomputation of row _i: the full Hessian's row function (which
    recomputes its flagged entries exactly) into blocks of its own, times the directions, summed
    again for every row of blocks."""
    lines = [f"_blocks = np.empty(({len(pairs)}, 1, _n, _n), {outs[0]}.dtype)"]
    stash = []
    if full["stash"]:
        lines.append(f"_stash = np.empty(({full['stash']}, _n))")
        stash = ["_stash"]
    blocks = [f"_blocks[{b}]" for b in range(len(pairs))]
    # output row 0 of _blocks, unweighted (None): _w multiplies the sums
    call = ["_i", "np.int64(0)", "_n", "_C", *arguments, "None", *blocks, *stash]
    lines.append(f"_hess_full_row({', '.join(call)})")
    lines.append("for _j in range(_n):")
    for r in range(len(outs)):
        lines.append(f"{INDENT}_s{r} = 0.0")
    lines.append(f"{INDENT}for _l in range(_n):")
    for b, (r, c) in enumerate(pairs):
        lines.append(f"{INDENT * 2}_s{r} += _blocks[{b}, 0, _j, _l] * {directions[c]}[_i, _l]")
    for r, out in enumerate(outs):
        lines.append(f"{INDENT}{out}[_i, _j] = _w * _s{r}")
    return [INDENT * 2 + line for line in lines]


def _fallback_plans(original: RowDerivation, stable: RowDerivation) -> dict:
    """{(quantity, prediction index): exact_rows.RegionPlans} for the outputs of the quantities in
    EXACT_FALLBACK that have the form of a quotient over row sums (lossgen/exact_rows.py), and
    {("hess_full", block): (RegionPlans, PairFallback)} for the Hessian's blocks, in row-major
    order of the predictions."""
    spec = original.spec
    reductions = {r.symbol: r for r in original.reductions}
    if not set(reductions) <= {r.symbol for r in stable.reductions}:
        return {}  # the guard evaluates the derivation's numerator on the kernels' row values
    parameters = [spec.symbols[p.name] for p in spec.params]
    # the inputs' domains, for the signs of the reductions' summands (exact_rows.magnitude_sums)
    ranges = axis_ranges(spec)
    plans = {}
    for q in ("grad", "hess"):
        if q not in EXACT_FALLBACK["quantities"]:
            continue
        for j, (o, s) in enumerate(zip(getattr(original, q), getattr(stable, q))):
            f = plan(o, s, reductions, original.element_symbols, parameters, ranges)
            if f is not None:
                plans[q, j] = f
    # each Hessian block (in row-major order of the predictions): its diagonal's plan (hess on a
    # prediction's own block, the cross derivative between two) and its other entries'
    for b, (i, j) in enumerate(_block_pairs(original)):
        if "hess_full" not in EXACT_FALLBACK["quantities"] or _indices(stable.blocks[i, j], stable):
            continue
        if i == j:
            diagonal, stable_diagonal = original.hess[i], stable.hess[i]
        elif (i, j) in original.cross and (i, j) in stable.cross:
            diagonal, stable_diagonal = original.cross[i, j], stable.cross[i, j]
        else:
            continue
        block = plan_block(diagonal, stable_diagonal, original.blocks[i, j].outer, stable.blocks[i, j].outer,
                           reductions, original.element_symbols, parameters, ranges)
        if block is not None:
            plans["hess_full", b] = block
    return plans


def _double_word_plans(stable: RowDerivation, planned) -> dict:
    """{("hess_full", block): (None, double_word.DoubleWordBlock)} for the Hessian's blocks that
    have no exact plan (``planned``'s keys) and whose outer products double-word arithmetic can
    evaluate (lossgen/double_word.py)."""
    spec = stable.spec
    inputs = {spec.symbols[i.name] for i in spec.inputs} | {spec.symbols[p.name] for p in spec.params}
    inputs |= {ROW_SIZE}
    plans = {}
    for b, (i, j) in enumerate(_block_pairs(stable)):
        if ("hess_full", b) in planned or _indices(stable.blocks[i, j], stable):
            continue
        block = plan_double_word(stable.blocks[i, j].outer, list(stable.reductions), stable.exact, inputs)
        if block is not None:
            plans["hess_full", b] = (None, block)
    return plans


def _double_word_lines(derivation: RowDerivation, printer, keys, arguments, blocks) -> list[str]:
    """The double-word recomputation's lines (double_word.emit_double_word_blocks)."""
    body = _Body(derivation, printer, keys)
    emit_double_word_blocks(body, blocks, lambda s: printer.doprint(body.rename(s)),
                            lambda r: f"_exact{r.name}({', '.join(['_i', '_n', '_C', *arguments])})")
    return body.lines


def emit_softmax_tie(body: _Body, r: Reduction):
    """The body of _tie<R>(..., c): 1 - 2 p_c for R = logsumexp(g), where softmax_tie's form has
    lost more than SOFTMAX_TIE_THRESHOLD's bits (:meth:`RowPrinter._print_softmax_tie`), as
    (T - 1)/(T + 1), T = sum_{k != c} exp(g_k - g_c): each g_k - g_c split exactly (two-sum), its
    exponential a double-word (the helper _exp_double_word, relative error below 2**-95) and T - 1
    summed in double-word, so that the tie keeps the digits that the rounded weights lose. Called
    only where |d| < 1/2, so p_c is in (1/4, 3/4) and T in (1/3, 3): no overflow. g is the summand
    as the kernels compute it (the logits themselves in the catalog)."""
    outside = r.summand.free_symbols - set(body.element) - {body.derivation.spec.symbols[p.name]
                                                           for p in body.derivation.spec.params}
    assert not outside, f"softmax_tie: the summand of {r.symbol} reads {sorted(map(str, outside))}, not only the row"
    printed = body.printer.doprint(body.rename(r.summand))
    body.printer.helpers_used.update(("exp_double_word", "fma"))
    body.emit(2, "_k = _c")
    body.bind([r.summand], 2)
    body.emit(2, f"_gc = {printed}")
    body.emit(2, "_th = -1.0")
    body.emit(2, "_tl = 0.0")
    body.emit(2, "_tt = 1.0")
    body.emit(2, "for _k in range(_n):")
    body.emit(3, "if _k == _c:")
    body.emit(4, "continue")
    body.bind([r.summand], 3)
    for line in [f"_g = {printed}", "_dh = _g - _gc", "_dz = _dh - _g", "_dl = (_g - (_dh - _dz)) + (-_gc - _dz)",
                 "_ph, _pl = _exp_double_word(_dh, _dl)", *add_split_lines("_th", "_tl"), "_tt += _ph"]:
        body.emit(3, line)
    body.emit(2, "return (_th + _tl) / _tt")


def _with_magnitude_sums(stable: RowDerivation, plans: dict) -> RowDerivation:
    """``stable`` with the reductions sum_k |summand| that the plans' tests read."""
    found = {}
    for value in plans.values():
        for part in (value if isinstance(value, tuple) else (value,)):  # RegionPlans, PairFallback
            for _, f in part.regions:
                found.update(f.magnitudes if f is not None else {})
    extra = tuple(Reduction(symbol, "sum", summand) for symbol, summand in found.items())
    return replace(stable, reductions=stable.reductions + extra) if extra else stable


def render_row_module(original: RowDerivation, stable: RowDerivation, spec_path: str) -> str:
    """The source of one generated row-wise module (``original`` gives the docstring's
    formulas, ``stable`` the code)."""
    spec = stable.spec
    arguments = [i.name for i in spec.inputs] + [p.name for p in spec.params]
    printer = RowPrinter(arguments)
    outputs = {"loss": [stable.loss], "grad": list(stable.grad), "hess": list(stable.hess)}
    keys = tie_keys(original)
    plans = _fallback_plans(original, stable)
    stable = _with_magnitude_sums(stable, plans)
    kernels = []
    for name, quantities in ROW_KERNELS.items():
        row_outputs = outputs["loss"] if "loss" in quantities else []
        element_quantities = [q for q in quantities if q != "loss"]
        element_outputs = [e for q in element_quantities for e in outputs[q]]
        fallbacks, shared, at = {}, [], 0
        for q in element_quantities:
            for j in range(len(outputs[q])):
                if (q, j) in plans:
                    fallbacks[at + j] = plans[q, j]
            if any((q, j) in plans for j in range(len(outputs[q]))) and (q,) != quantities:
                shared.append((q, at, len(outputs[q])))  # the kernel of q alone has the recomputation
            at += len(outputs[q])
        kernels.append(_kernel(stable, name, row_outputs, element_outputs, printer, keys, fallbacks, arguments,
                               shared))
    # the recomputation of the Hessian's blocks, for the full Hessian and the product
    plans.update(_double_word_plans(stable, plans))
    block_fallbacks = {b: plan for (q, b), plan in plans.items() if q == "hess_full"}
    full = _block_kernel(stable, printer, product=False, keys=keys, fallbacks=block_fallbacks, arguments=arguments)
    kernels.append(_block_kernel(stable, printer, product=True, keys=keys, fallbacks=block_fallbacks,
                                 arguments=arguments, full=full))
    kernels.append(full)
    directions = [d.name for d in stable.directions]
    predictions = [p.name for p in spec.predictions]
    formulas = {"loss": sp.sstr(original.spec.loss),
                "reductions": [f"{r.symbol} = {r.kind}_k({sp.sstr(r.summand)})"
                               + (f" at {r.index}" if r.kind == "take" else "") for r in original.reductions],
                "lowered": sp.sstr(original.loss),
                "grad": [{"name": p, "expr": sp.sstr(g)} for p, g in zip(predictions, original.grad)]}
    first_row_input = next(i.name for i in spec.inputs if i.axis and not i.shared)
    row_helpers = []
    for symbol, monomials in stable.exact.items():
        body = _Body(stable, printer, keys)
        emit_exact_sum(body, monomials)
        reduction = next(r for r in stable.reductions if r.symbol == symbol)
        row_helpers.append({"name": f"_exact{symbol.name}", "parameters": ["_i", "_n", "_C", *arguments],
                            "lines": body.lines, "doc": f"{symbol} = sum_k({sp.sstr(reduction.summand)})",
                            "summary": "A row sum exactly, as (hi, lo): its monomials as one expansion "
                                       "(lossgen/exact_rows.py).\n    The kernels call it where the sum cancels."})
    for reduction in (r for r in stable.reductions if softmax_tie_helper(r).name in printer.softmax_ties):
        body = _Body(stable, printer, keys)
        emit_softmax_tie(body, reduction)
        row_helpers.append({"name": softmax_tie_helper(reduction).name, "lines": body.lines,
                            "parameters": ["_i", "_n", "_C", *arguments, "_c"],
                            "doc": f"{reduction.symbol} = logsumexp_k({sp.sstr(reduction.summand)})",
                            "summary": "1 - 2 p_c of R's softmax weight p_c at class _c, from the row in "
                                       "double-word arithmetic.\n    The kernels call it where their form "
                                       "of it cancels (vocabulary.softmax_tie)."})
    return template_environment().get_template("row_module.py.j2").render(
        spec=spec, spec_path=spec_path, marker=MARKER, formulas=formulas, row_helpers=row_helpers,
        helpers=printer.helpers_used, kernels=kernels, arguments=arguments, directions=directions,
        kernel_outputs={k["name"]: len(k["outs"]) for k in kernels}, rows_of=first_row_input,
        quadratic=tuple(k["name"] for k in kernels if k.get("quadratic")),
    )
