"""Stage 5 for row-wise losses: kernels against the loss written out for concrete row lengths.

For each size C (1, 2, 3, 7 by default) the spec's loss is expanded into explicit scalar
symbols x_0 ... x_{C-1}: sum becomes an addition of C terms, logsumexp log(exp + ... + exp),
max and min the first largest (smallest) element at the point being checked, found in
high precision; take and onehot pick by the row's class index.
SymPy differentiates that expression directly, so the truth for the gradient, the Hessian's
diagonal, every (C, C) block and the Hessian-vector product (every row up to C = 3, every fourth
at C = 7: :func:`full_hessian_at`) is independent of the row program (:mod:`lossgen.derive_rows`) that the kernels come from. Values are computed by
mpmath as in :mod:`lossgen.verify` (50 digits and more). The gradient of the expanded loss is
also checked against its finite differences.

The bound is the elementwise one, relative error <= 1e-12 wherever the truth is a normal
float64, except for the Hessian-vector product: a sum over the row, sum_l H_jl v_l, whose
terms may cancel, so its error is measured relative to sum_l |H_jl v_l|.
"""
from __future__ import annotations

import math

import mpmath
import numpy as np
import sympy as sp

from .derive import almost_everywhere, kinks_of
from .domains import DOMAINS
from .reductions import ROW_SIZE, logsumexp, onehot, rowmax, rowmin, rowsum, take
from .verify import (LARGEST, RELATIVE_TOLERANCE, Row, _at_discontinuity, _merge, _neighbours, evaluate,
                     parameter_sets, relative_error, sample_domain)
from .vocabulary import MPMATH_IMPLEMENTATIONS

SIZES = (1, 2, 3, 7)
# every (C, C) entry and the product are checked at every row up to this size; beyond it at every
# FULL_HESSIAN_STRIDE-th row (the first among them), the diagonal at the others. The full truth at C = 7
# at every row made `lossgen verify` of the row-wise catalog 3.1 times as long (277 s against 88 s):
# global SSIM's 196 entries cost a second of mpmath a row
FULL_HESSIAN_UP_TO = 3
FULL_HESSIAN_STRIDE = 4
ROW_EXTREMES = (1000.0, -1000.0)  # logits far apart: softmax saturates, exp overflows naively
CONSTANT_ROWS = (0.0, 1e-300, 1.0, -1.0, 1000.0, -1e300, 1e300, 0.5)  # whole rows of one value


class explicit_logsumexp(sp.Function):
    """log(exp(a_0) + ... + exp(a_{C-1})) of explicit terms; d/da_i = exp(a_i - logsumexp).
    mpmath evaluates it shifted by the largest term, so that exp(1e300) is never formed."""

    def fdiff(self, argindex=1):
        return sp.exp(self.args[argindex - 1] - self)


def _mp_logsumexp(*terms):
    top = max(terms)
    return top + mpmath.log(mpmath.fsum(MPMATH_IMPLEMENTATIONS["exp"](t - top) for t in terms))


def _mp_function(expr, arguments):
    modules = [dict(MPMATH_IMPLEMENTATIONS, explicit_logsumexp=_mp_logsumexp), "mpmath"]
    return sp.lambdify(arguments, expr, modules=modules)


class Expansion:
    """The spec's loss written out for C elements and given class indices."""

    def __init__(self, spec, size: int, indices: dict, point: list | None = None):
        """With ``point`` (values of :meth:`arguments`), max and min are the element that is
        largest (smallest) at that point, the first one on a tie, found in high precision;
        without, a Piecewise over all orderings (differentiating that is slow for C = 7)."""
        self.spec, self.size, self.indices, self.point = spec, size, indices, point
        self.picks: list[int] = []
        self.element = {spec.symbols[i.name]: i for i in spec.inputs if i.axis}
        self.symbols = {i.name: [sp.Symbol(f"{i.name}_{k}", **DOMAINS[i.domain].assumptions) for k in range(size)]
                        for i in spec.inputs if i.axis}
        self.per_row = [spec.symbols[i.name] for i in spec.inputs if not i.axis and i.domain != "class_index"]
        self.params = [spec.symbols[p.name] for p in spec.params]

    def arguments(self) -> list[sp.Symbol]:
        return [s for i in self.spec.inputs if i.axis for s in self.symbols[i.name]] + self.per_row + self.params

    def pick(self, values: list, largest: bool) -> int:
        """The first element of ``values`` that is largest (smallest) at the point."""
        arguments = self.arguments()
        numbers = [evaluate(_mp_function(v, arguments), self.point) for v in values]
        if any(n is None for n in numbers):
            raise ValueError("max or min of a value that is not finite")
        best = max(numbers) if largest else min(numbers)
        self.picks.append(numbers.index(best))
        return self.picks[-1]

    def at(self, expr: sp.Expr, k: int | None) -> sp.Expr:
        """``expr`` with its element symbols at element ``k`` and reductions written out."""
        C = range(self.size)
        if isinstance(expr, rowsum):
            return sp.Add(*(self.at(expr.args[0], j) for j in C))
        if isinstance(expr, logsumexp):
            return explicit_logsumexp(*(self.at(expr.args[0], j) for j in C))
        if isinstance(expr, (rowmax, rowmin)):
            values = [self.at(expr.args[0], j) for j in C]
            if self.point is not None:
                return values[self.pick(values, isinstance(expr, rowmax))]
            better = sp.Ge if isinstance(expr, rowmax) else sp.Le
            return sp.Piecewise(*[(v, sp.And(*(better(v, w) for w in values[j + 1:])))
                                  for j, v in enumerate(values[:-1])], (values[-1], True))
        if isinstance(expr, take):
            return self.at(expr.args[0], self.indices[expr.args[1]])
        if isinstance(expr, onehot):
            return sp.S.One if k == self.indices[expr.args[0]] else sp.S.Zero
        if expr == ROW_SIZE:
            return sp.Integer(self.size)
        if expr in self.element:
            if k is None:
                raise ValueError(f"{expr} outside a reduction")
            return self.symbols[expr.name][k]
        if not expr.args or isinstance(expr, sp.Symbol):
            return expr
        return expr.func(*[self.at(a, k) for a in expr.args])


_TRUTHS: dict = {}


def truth_functions(spec, size: int, index_values: tuple, full: bool, point: dict, params: dict) -> dict:
    """quantity -> mpmath function of the expansion's arguments: 'loss', ('grad', p, j),
    ('hess', p, q, j, l) for every entry (``full``) or the diagonal entries only. The
    expansion is that of ``point``'s class indices, and of its arg-maxes where the loss has
    a max or min."""
    indices = dict(zip([spec.symbols[i.name] for i in spec.inputs if i.domain == "class_index"], index_values))
    picks, loss = (), None
    if spec.loss.has(rowmax, rowmin):
        expansion = Expansion(spec, size, indices)
        values = _argument_values([a.name for a in expansion.arguments()], point, params)
        expansion = Expansion(spec, size, indices, values)
        loss = expansion.at(spec.loss, None)
        picks = tuple(expansion.picks)
    key = (spec.path, spec.source_hash, size, index_values, picks, full)
    if key not in _TRUTHS:
        _TRUTHS[key] = _truth_functions(spec, size, indices, full, loss)
    return _TRUTHS[key]


def _truth_functions(spec, size, indices, full, loss=None):
    expansion = Expansion(spec, size, indices)
    arguments = expansion.arguments()
    loss = expansion.at(spec.loss, None) if loss is None else loss
    functions = {"loss": _mp_function(loss, arguments)}
    predictions = [p.name for p in spec.predictions]
    gradients, seconds = {}, []
    for p in predictions:
        for j, x in enumerate(expansion.symbols[p]):
            gradients[p, j] = almost_everywhere(sp.diff(loss, x))
            functions["grad", p, j] = _mp_function(gradients[p, j], arguments)
    for p in predictions:
        for q in predictions:
            for j in range(size):
                for l in (range(size) if full else [j] if p == q else []):
                    seconds.append(almost_everywhere(sp.diff(gradients[p, j], expansion.symbols[q][l])))
                    functions["hess", p, q, j, l] = _mp_function(seconds[-1], arguments)
    variables = [x for p in predictions for x in expansion.symbols[p]]
    kinks = [_mp_function(k, arguments) for k in kinks_of([loss, *gradients.values(), *seconds], variables)]
    return {"functions": functions, "arguments": [a.name for a in arguments], "loss": loss,
            "expansion": expansion, "kinks": kinks, "variables": [x.name for x in variables]}


# --- points --------------------------------------------------------------------------------

def row_points(spec, size: int, n_random: int, n_stress: int, seed: int = 0) -> list[dict]:
    """Rows of inputs: ``n_random`` sampled from the domains, ``n_stress`` from their extremes
    (logits at +-1000 too), and constant rows of each extreme (zero vectors included)."""
    rng = np.random.default_rng([seed, size])
    points = []

    def per_row_value(i, stress):
        if i.domain == "class_index":
            return int(rng.integers(0, size))
        if stress:
            return float(rng.choice(DOMAINS[i.domain].extremes))
        return float(sample_domain(i.domain, 1, rng)[0])

    def extremes(domain):
        grid = DOMAINS[domain].extremes
        if DOMAINS[domain].contains(ROW_EXTREMES[0]) and domain != "class_index":
            grid = grid + tuple(x for x in ROW_EXTREMES if DOMAINS[domain].contains(x))
        return np.array(grid)

    for index in range(n_random + n_stress):
        stress = index >= n_random
        point = {}
        for i in spec.inputs:
            if i.axis:
                point[i.name] = rng.choice(extremes(i.domain), size) if stress else sample_domain(i.domain, size, rng)
            else:
                point[i.name] = per_row_value(i, stress)
        points.append(point)
    constant_rows = sorted({float(x) for i in spec.inputs if i.axis and i.role == "prediction"
                            for x in extremes(i.domain) if x in CONSTANT_ROWS})
    for value in constant_rows:
        point = {i.name: (np.full(size, value) if i.role == "prediction" and DOMAINS[i.domain].contains(value)
                          else sample_domain(i.domain, size, rng)) if i.axis else per_row_value(i, False)
                 for i in spec.inputs}
        points.append(point)
    return points


# --- checks --------------------------------------------------------------------------------

def _argument_values(names: list[str], point: dict, params: dict) -> list[float]:
    """The truth's arguments at ``point``: element k of a row input (named ``x_k``), a per-row
    input, or a parameter."""
    values = []
    for name in names:
        base, _, k = name.rpartition("_")
        if base in point and isinstance(point[base], np.ndarray):
            values.append(float(point[base][int(k)]))
        else:
            values.append(float(point[name]) if name in point else params[name])
    return values


def _kernel_results(loss, spec, points, params, size, rng, leave_out=()):
    """Every kernel on the stacked rows: quantity -> array, and the directions used for hvp.
    The shared inputs named in ``leave_out`` are not passed (they take their defaults)."""
    given = {}
    for i in spec.inputs:
        if i.name in leave_out:
            continue
        if i.axis and i.shared:
            given[i.name] = points[0][i.name]  # shared inputs are drawn once per batch
        else:
            given[i.name] = np.array([p[i.name] for p in points])
    arguments = {**given, **params}  # inputs by name, and the parameters
    predictions = [p.name for p in spec.predictions]
    directions = tuple(rng.normal(size=(len(points), size)) for _ in predictions)

    def per_prediction(out):
        return out if isinstance(out, tuple) else (out,)

    results = {"loss": [loss.loss(reduction="none", **arguments)]}
    outs = loss.loss_grad_hess(**arguments)
    results["loss"].append(outs[0])
    grads = [per_prediction(loss.grad(**arguments)), per_prediction(outs[1]),
             per_prediction(loss.grad_hess(**arguments)[0])]
    diagonals = [per_prediction(loss.hess(**arguments)), per_prediction(outs[2]),
                 per_prediction(loss.grad_hess(**arguments)[1])]
    full = loss.hess(full=True, **arguments)
    if len(predictions) == 1:
        full = ((full,),)
    hvp = per_prediction(loss.hvp(v=directions if len(predictions) > 1 else directions[0], **arguments))
    for a, p in enumerate(predictions):
        results["grad", p] = [g[a] for g in grads]
        results["hess", p] = [d[a] for d in diagonals]
        results["hvp", p] = [hvp[a]]
        for b, q in enumerate(predictions):
            results["full", p, q] = [full[a][b]]
    return results, directions


def full_hessian_at(size: int, n: int) -> bool:
    """Is every Hessian entry (and the product) checked at row ``n`` of a check at this size?"""
    return size <= FULL_HESSIAN_UP_TO or n % FULL_HESSIAN_STRIDE == 0


def check_size(loss, spec, size: int, points: list[dict], params: dict, seed: int = 0,
               n_random: int = 0, gap=None, leave_out=()) -> list[Row]:
    """All kernels of ``loss`` at row length ``size`` against the expanded truth. ``gap(output,
    point, entry)`` (entry: (j, l) of a Hessian entry, (j,) of a gradient, () of the loss) marks
    a known gap: that value is reported apart, under '<output> known gap'. The shared inputs
    named in ``leave_out`` are left out of the calls, and the truth takes their defaults."""
    rng = np.random.default_rng(seed)
    shared = {i.name: np.full(size, i.default) if i.name in leave_out else points[0][i.name]
              for i in spec.inputs if i.axis and i.shared}
    points = [{**p, **shared} for p in points]
    computed, directions = _kernel_results(loss, spec, points, params, size, rng, leave_out)
    predictions = [p.name for p in spec.predictions]
    index_inputs = [i.name for i in spec.inputs if i.domain == "class_index"]
    worst: dict = {}

    def measure(value, truth, scale):
        if scale is not None:
            return float(abs(mpmath.mpf(value) - truth) / max(scale, np.finfo(float).tiny))
        return relative_error(value, truth)

    def record(label, value, truth, point, scale=None, entry=(), near=None):
        """``near(shifted)``, the (truth, scale) at other arguments: at a kink (see
        :func:`lossgen.verify.check_kernels`) the truth at a neighbouring float of a prediction's
        element counts as well (at C = 1 and x1 = x2, contrastive's Hessian sign(u)**2 is 0, and
        1 on either side)."""
        if gap is not None and gap(label, point, entry):
            label = f"{label} known gap"
        row = worst.setdefault(label, [0.0, {}, 0, 0])
        row[2] += 1
        if truth is None or abs(truth) > LARGEST:
            return
        if not math.isfinite(value):
            row[3] += 1
            error = math.inf
        else:
            error = measure(value, truth, scale)
            if error > RELATIVE_TOLERANCE and near is not None and _at_discontinuity(kinks, names, args, variables):
                for shifted in _neighbours(names, args, variables):
                    t, s = near(shifted)
                    if t is not None:
                        error = min(error, measure(value, t, s))
        if error > row[0]:
            row[0], row[1] = error, point

    def truth_at(function):
        return lambda shifted: (evaluate(function, shifted), None)

    def hvp_of(entries, n):
        """sum_l H_jl v_l and sum_l |H_jl v_l| (the module docstring) of a Hessian row's entries,
        in the order of ``predictions`` and l."""
        if any(h is None for h in entries):
            return None, None
        terms = [h * float(directions[b][n, l]) for h, (b, l) in
                 zip(entries, ((b, l) for b in range(len(predictions)) for l in range(size)))]
        return mpmath.fsum(terms), sum(abs(t) for t in terms)

    def hvp_at(p, j, n):
        return lambda shifted: hvp_of([evaluate(functions["hess", p, q, j, l], shifted)
                                       for q in predictions for l in range(size)], n)

    for n, point in enumerate(points):
        full = full_hessian_at(size, n)
        truths = truth_functions(spec, size, tuple(point[name] for name in index_inputs), full, point, params)
        functions, kinks, variables = truths["functions"], truths["kinks"], truths["variables"]
        names = truths["arguments"]
        args = _argument_values(names, point, params)
        shown = {**dict(zip(names, args)), **{name: point[name] for name in index_inputs}}
        truth_loss = evaluate(functions["loss"], args)
        for out in computed["loss"]:
            record("loss", float(out[n]), truth_loss, shown, near=truth_at(functions["loss"]))
        hessian = {}
        for p in predictions:
            for j in range(size):
                g = evaluate(functions["grad", p, j], args)
                for out in computed["grad", p]:
                    record(f"grad[{p}]", float(out[n, j]), g, shown, entry=(j,),
                           near=truth_at(functions["grad", p, j]))
            for q in predictions:
                for j in range(size):
                    for l in range(size):
                        key = ("hess", p, q, j, l)
                        if key in functions:
                            hessian[p, q, j, l] = evaluate(functions[key], args)
                for j in range(size):
                    if p == q:
                        for out in computed["hess", p]:
                            record(f"hess[{p}]", float(out[n, j]), hessian[p, q, j, j], shown, entry=(j, j),
                                   near=truth_at(functions["hess", p, q, j, j]))
                    if full:
                        for l in range(size):
                            record(f"hess_full[{p},{q}]", float(computed["full", p, q][0][n, j, l]),
                                   hessian[p, q, j, l], shown, entry=(j, l),
                                   near=truth_at(functions["hess", p, q, j, l]))
            if full:  # hvp against the truth's H v (see the module docstring)
                for j in range(size):
                    truth, scale = hvp_of([hessian[p, q, j, l] for q in predictions for l in range(size)], n)
                    if truth is None:
                        continue
                    record(f"hvp[{p}]", float(computed["hvp", p][0][n, j]), truth, shown, scale,
                           entry=(j,), near=hvp_at(p, j, n))
    return [Row(spec.name, f"{label} C={size}", count, error, point, spurious)
            for label, (error, point, count, spurious) in worst.items()]


def check_gradient_by_differences(spec, size: int, points: list[dict], params: dict, digits: int = 40) -> Row:
    """The expanded loss's symbolic gradient against mpmath's finite differences of the loss."""
    index_inputs = [i.name for i in spec.inputs if i.domain == "class_index"]
    worst, worst_point, checked = 0.0, {}, 0
    for point in points:
        truths = truth_functions(spec, size, tuple(point[name] for name in index_inputs),
                                 size <= FULL_HESSIAN_UP_TO, point, params)
        names = truths["arguments"]
        values = _argument_values(names, point, params)
        if any(abs(v) > 1e6 for v in values):
            continue  # finite differences need a smooth neighbourhood of moderate scale
        with mpmath.workdps(digits):
            loss = truths["functions"]["loss"]
            for p in spec.predictions:
                for j in range(size):
                    position = names.index(f"{p.name}_{j}")
                    symbolic = evaluate(truths["functions"]["grad", p.name, j], values)
                    if symbolic is None:
                        continue

                    def along(t, position=position):
                        shifted = [mpmath.mpf(v) for v in values]
                        shifted[position] = t
                        return loss(*shifted)

                    try:
                        numeric = mpmath.diff(along, mpmath.mpf(values[position]))
                    except (ZeroDivisionError, ValueError):
                        continue
                    scale = max(abs(symbolic), mpmath.mpf(1e-30))
                    error = float(abs(numeric - symbolic) / scale)
                    checked += 1
                    if error > worst:
                        worst, worst_point = error, dict(zip(names, values))
    return Row(spec.name, f"grad vs finite differences C={size}", checked, worst, worst_point, 0)


# random rows and extreme rows per size, in `lossgen verify` and the tests alike (a row costs C**2
# truths where every entry is checked, full_hessian_at): the tests' sample of 4 and 6 missed rows
# that this one reaches
ROW_POINTS = 12


def verify_rows(loss, spec, sizes=SIZES, n_random: int = 8, n_stress: int = 12, seed: int = 0,
                differences: bool = True, gap=None, leave_out=(), params=None) -> list[Row]:
    """Every kernel of a row-wise loss at each size, at random, extreme and constant rows, for
    each parameter set of :func:`lossgen.verify.parameter_sets` (the elementwise losses' sets:
    defaults, a second set, the domains' closed ends; extreme rows where the elementwise check
    takes the stress grid), or for the sets in ``params``; with ``differences``, the expanded
    gradient by finite differences. Rows of the same output are merged over the sets, their
    worst point showing the parameters. Values where ``gap`` holds are reported apart (see
    :func:`check_size`). Shared inputs are passed, except those named in ``leave_out``, which
    take their defaults (where the spec marks them ``specialise = true``, with the parameters
    at their defaults this runs the kernels specialised at defaults)."""
    stressed = parameter_sets(spec, singled_out=False)
    rows = []
    for values in parameter_sets(spec) if params is None else params:
        stress = n_stress if values in stressed else 0
        for size in sizes:
            points = row_points(spec, size, n_random, stress, seed)
            rows.extend(check_size(loss, spec, size, points, values, seed, n_random, gap, leave_out))
            if differences:
                rows.append(check_gradient_by_differences(spec, size, points[:min(n_random, 3)], values))
    return _merge(rows)
