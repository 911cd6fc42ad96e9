"""Stage 5, verify: generated kernels against the symbolic truth, in high precision.

The truth is the spec's loss and its derivatives *before* stabilisation, evaluated by
mpmath at 50 significant digits or more (precision is doubled until two evaluations agree),
so a rewrite rule that changes a value is caught. The derivation itself is checked against
central finite differences of the loss, computed by ``mpmath.diff`` in high precision.

Points: random values per input domain, plus points at, next to (one ulp) and near every
kink of the loss. On a point within rounding distance of a discontinuity (a Hessian jump
at |r| = delta, say) a kernel may take either side: there it must match the truth at the
point or at one of its neighbouring floats.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import mpmath
import numpy as np
import sympy as sp

from .derive import KERNELS, Derivation, kink_expressions
from .domains import DOMAINS
from .vocabulary import MPMATH_IMPLEMENTATIONS

DIGITS = 50                  # working precision of the truth, in decimal digits
CANCELLATION_DIGITS = 350    # a cancellation deeper than a normal float64's range shows at +350 digits
RESOLVING_DIGITS_LIMIT = 3000  # the most digits spent on a truth that is undefined at the usual ones
RELATIVE_TOLERANCE = 1e-12   # kernel vs truth, where the truth is a normal float64
SMALLEST_NORMAL = np.finfo(np.float64).tiny
LARGEST = np.finfo(np.float64).max


# --- truth -------------------------------------------------------------------------------

def mp_function(expr: sp.Expr, arguments: list[sp.Symbol]):
    """``expr`` as a Python function of mpmath numbers."""
    return sp.lambdify(arguments, expr, modules=[MPMATH_IMPLEMENTATIONS, "mpmath"])


def evaluate(function, values, digits: int = DIGITS):
    """``function(*values)`` in mpmath, with precision raised until two evaluations agree.

    The first precision is ``digits`` plus the decimal exponent range of the inputs, so that
    sums like 1 + 1e-300 are exact before any comparison. Two close precisions can agree on a
    value that cancelled to 0 in both (-log(sigmoid(700)) = 1e-304 needs 300 digits), so the
    second evaluation has ``CANCELLATION_DIGITS`` more: beyond a float64's range. Where the
    value is undefined at these precisions because a part of it cancelled to 0 and was then
    divided by or raised to a negative power (1 - p at p = 1 - 2e-435, a softmax at logits
    (1000, 0, 0)), it is evaluated again where exp(-2|v|) of every input v shows beside 1 (1 - p_y
    at logits (-1000, 1000) is e**-2000), up to ``RESOLVING_DIGITS_LIMIT`` digits. Returns an
    mpf, or None where the value is not a finite real (nan, inf, complex) at any of these
    precisions.
    """
    start = _start_digits(values, digits)
    # the second precision is far higher: a part of the value that cancelled to 0 in the
    # first (1 - sigmoid(-700) = 1 - 1e-304) shows up in the second
    first = start + CANCELLATION_DIGITS
    value, undefined = _agreed(function, values, [start, first, 2 * first, 4 * first], digits)
    if undefined is not None:
        magnitude = max((abs(float(v)) for v in values if math.isfinite(float(v))), default=0.0)
        resolving = first + int(2 * magnitude / math.log(10)) + 1  # logits -v and v: e**-2v
        if undefined < resolving <= RESOLVING_DIGITS_LIMIT:
            value, _ = _agreed(function, values, [resolving, resolving + CANCELLATION_DIGITS], digits)
    return value


def _agreed(function, values, precisions, digits):
    """(value, None) at the first of ``precisions`` where two evaluations in turn agree to
    ``digits``/2 + 10 digits, else the last value; (None, precision) where the value is not a
    finite real at that precision."""
    previous = None
    for dps in precisions:
        with mpmath.workdps(dps):
            try:
                value = function(*[mpmath.mpf(float(v)) for v in values])
            except (ZeroDivisionError, ValueError, OverflowError):
                return None, dps
            if isinstance(value, bool) or not isinstance(value, mpmath.mpf):
                value = mpmath.mpmathify(value)
            if not isinstance(value, mpmath.mpf) or not mpmath.isfinite(value):
                return None, dps
            if previous is not None and abs(value - previous) <= abs(value) * mpmath.mpf(10) ** (-digits // 2 - 10):
                return value, None
            previous = value
    return previous, None


def _start_digits(values, digits: int = DIGITS) -> int:
    """``digits`` plus the decimal exponent range of the values: 1 + 1e-300 is then exact."""
    exponents = [abs(math.frexp(float(v))[1]) for v in values if v != 0 and math.isfinite(float(v))]
    return digits + int(max(exponents, default=0) * math.log10(2)) + 1


def relative_error(computed: float, truth) -> float:
    """|computed - truth| / |truth|; against a truth below the smallest normal float64, the
    absolute error in units of that smallest normal."""
    if not math.isfinite(computed):
        return math.inf
    scale = max(abs(truth), SMALLEST_NORMAL)
    return float(abs(mpmath.mpf(computed) - truth) / scale)


# --- points ------------------------------------------------------------------------------

def sample_domain(domain: str, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` random values of an input domain, spread over several orders of magnitude."""
    d = DOMAINS[domain]
    if d.values:
        return rng.choice(np.array(d.values), size=n)
    if d.low <= -1e6 and d.high >= 1e6:  # real line (or as wide): unit scale, wider, magnitudes 1e-6 .. 1e2
        parts = [rng.normal(0, 1, n), rng.normal(0, 10, n),
                 rng.choice([-1.0, 1.0], n) * 10.0 ** rng.uniform(-6, 2, n)]
        pick = rng.integers(0, 3, n)
        return np.choose(pick, parts)
    if d.low == -math.inf or d.high == math.inf:  # half line, from its finite end
        end, closed, sign = (d.low, d.low_closed, 1.0) if d.high == math.inf else (d.high, d.high_closed, -1.0)
        values = end + sign * 10.0 ** rng.uniform(-6, 3, n)
        if closed:
            values[rng.random(n) < 0.05] = end
        return values
    values = rng.uniform(d.low, d.high, n)  # bounded interval
    if d.low_closed:
        values[rng.random(n) < 0.05] = d.low
    if d.high_closed:
        values[rng.random(n) < 0.05] = d.high
    return values


def parameter_sets(spec, singled_out: bool = True) -> list[dict[str, float]]:
    """The parameter sets a loss is verified at, elementwise and row-wise alike: the spec's
    defaults, a second set of values inside each domain, each parameter at the closed ends of
    its domain that differ from its default (gamma = 0 of a non-negative domain, 0 and 1 of the
    unit interval), and, with ``singled_out``, at the values a condition of the loss singles
    out (alpha == 0 in Barron's loss), one ulp and 1e-8 away from them; in the last two the
    other parameters keep their defaults."""
    defaults = {p.name: p.default for p in spec.params}
    if not defaults:
        return [defaults]
    other = {}
    for p in spec.params:
        d = DOMAINS[p.domain]
        candidates = [p.default * 2.5, p.default + 1.5, 0.25, 0.75, 0.5] if not d.values else list(d.values)
        other[p.name] = next(c for c in candidates if d.contains(c) and c != p.default)
    sets = [defaults, other]

    def add(values):
        if values not in sets:
            sets.append(values)

    for p in spec.params:
        d = DOMAINS[p.domain]
        for end, closed in ((d.low, d.low_closed), (d.high, d.high_closed)):
            if closed and math.isfinite(end) and d.contains(end) and end != p.default:
                add({**defaults, p.name: float(end)})
    if singled_out:
        for p in spec.params:
            symbol = spec.symbols[p.name]
            for condition in spec.loss.atoms(sp.Eq):
                if symbol in condition.free_symbols and len(condition.free_symbols) == 1:
                    for value in sp.solve(condition, symbol):
                        v = float(value)
                        for near in (v, np.nextafter(v, -np.inf), np.nextafter(v, np.inf), v - 1e-8, v + 1e-8):
                            if DOMAINS[p.domain].contains(float(near)):
                                add({**defaults, p.name: float(near)})
    return sets


@dataclass
class Points:
    """Evaluation points: input name -> float64 array; ``near_kink`` marks kink points."""

    values: dict[str, np.ndarray]
    near_kink: np.ndarray = field(default=None)

    def __len__(self):
        return len(self.near_kink)


def sample_points(derivation: Derivation, params: dict[str, float], n: int = 200, seed: int = 0) -> Points:
    spec = derivation.spec
    rng = np.random.default_rng(seed)
    values = {i.name: sample_domain(i.domain, n, rng) for i in spec.inputs}
    kink_values = _kink_points(derivation, params, values, rng)
    merged = {k: np.concatenate([values[k], kink_values[k]]) for k in values}
    near = np.concatenate([np.zeros(n, bool), np.ones(len(next(iter(kink_values.values()))), bool)])
    return Points(merged, near)


def stress_points(derivation: Derivation, params: dict[str, float], limit: int = 1500, seed: int = 0) -> Points:
    """Every combination of the inputs' extreme values (a random subset beyond ``limit``), and
    the kinks found from them as bases."""
    spec = derivation.spec
    rng = np.random.default_rng(seed)
    combinations = list(itertools.product(*(DOMAINS[i.domain].extremes for i in spec.inputs)))
    if len(combinations) > limit:
        combinations = [combinations[k] for k in sorted(rng.choice(len(combinations), limit, replace=False))]
    values = {i.name: np.array([c[k] for c in combinations], dtype=np.float64) for k, i in enumerate(spec.inputs)}
    kink_values = _kink_points(derivation, params, values, rng, bases=min(40, len(combinations)))
    merged = {k: np.concatenate([values[k], kink_values[k]]) for k in values}
    near = np.concatenate([np.zeros(len(combinations), bool), np.ones(len(kink_values[spec.inputs[0].name]), bool)])
    return Points(merged, near)


def _kink_points(derivation, params, base, rng, bases: int = 12) -> dict[str, np.ndarray]:
    """For each kink and prediction p: solve kink(p) = 0 at a few base points, and take the
    solution, its float neighbours, and points 1e-8 and 1e-3 (relative) away."""
    spec = derivation.spec
    symbols = spec.symbols
    out = {name: [] for name in base}
    parameter_values = {symbols[k]: v for k, v in params.items()}
    for kink in kink_expressions(derivation):
        for prediction in spec.predictions:
            p = symbols[prediction.name]
            if p not in kink.free_symbols:
                continue
            try:
                solutions = sp.solve(kink.subs(parameter_values), p)
            except (NotImplementedError, ValueError, TypeError):
                continue
            for solution in solutions:
                rest = sorted(solution.free_symbols, key=str)
                f = sp.lambdify(rest, solution, modules="math")
                for j in rng.choice(len(base[prediction.name]), size=bases, replace=False):
                    try:
                        at = float(f(*[base[s.name][j] for s in rest]))
                    except (ValueError, TypeError, OverflowError, ZeroDivisionError):
                        continue
                    if not math.isfinite(at) or not DOMAINS[prediction.domain].contains(at):
                        continue
                    step = max(abs(at), 1.0)
                    for q in (at, np.nextafter(at, -np.inf), np.nextafter(at, np.inf),
                              at - 1e-8 * step, at + 1e-8 * step, at - 1e-3 * step, at + 1e-3 * step):
                        if DOMAINS[prediction.domain].contains(q):
                            for name in out:
                                out[name].append(q if name == prediction.name else base[name][j])
    return {k: np.array(v, dtype=np.float64) for k, v in out.items()}


# --- checks ------------------------------------------------------------------------------

@dataclass
class Row:
    """One line of the accuracy report."""

    loss: str
    output: str
    points: int
    max_error: float
    worst: dict
    spurious_nonfinite: int  # kernel nan/inf where the truth is a finite float64

    def ok(self, tolerance: float = RELATIVE_TOLERANCE) -> bool:
        return self.max_error <= tolerance and self.spurious_nonfinite == 0

    @property
    def in_known_gap(self) -> bool:
        """Values inside a documented gap (lossgen.known_gaps), reported apart by verify_rows."""
        return " known gap" in self.output


def truth_functions(derivation: Derivation) -> dict[str, object]:
    """name of each quantity ('loss', 'grad[p]', 'hess[p]') -> mpmath function of all arguments."""
    spec = derivation.spec
    arguments = [spec.symbols[name] for name in spec.arguments]
    functions = {"loss": mp_function(derivation.loss, arguments)}
    for prediction, g, h in zip(spec.predictions, derivation.grad, derivation.hess):
        functions[f"grad[{prediction.name}]"] = mp_function(g, arguments)
        functions[f"hess[{prediction.name}]"] = mp_function(h, arguments)
    return functions


def kernel_outputs(loss, points: Points, params: dict[str, float]) -> dict[str, list[np.ndarray]]:
    """Run every kernel of ``loss``; quantity name -> the arrays computed for it."""
    arrays = [points.values[name] for name in loss.inputs]
    names = {"loss": ["loss"], "grad": [f"grad[{p}]" for p in loss.predictions],
             "hess": [f"hess[{p}]" for p in loss.predictions]}
    results: dict[str, list[np.ndarray]] = {}
    for kernel, quantities in KERNELS.items():
        if kernel == "loss":
            outs = [loss.loss(*arrays, reduction="none", **params)]
        else:
            outs = getattr(loss, kernel)(*arrays, **params)
            outs = _flatten(outs if isinstance(outs, tuple) else (outs,))
        labels = [label for q in quantities for label in names[q]]
        for label, out in zip(labels, outs):
            results.setdefault(label, []).append(np.asarray(out, dtype=np.float64))
    return results


def _flatten(items):
    flat = []
    for item in items:
        flat.extend(item if isinstance(item, tuple) else (item,))
    return flat


def check_kernels(loss, derivation: Derivation, points: Points, params: dict[str, float], skip=None) -> list[Row]:
    """Each kernel output against the truth, with the error measures of :class:`Row`; points
    for which ``skip(point)`` is true (a dict of argument values) are left out."""
    spec = derivation.spec
    truths = truth_functions(derivation)
    computed = kernel_outputs(loss, points, params)
    kinks = [mp_function(k, [spec.symbols[name] for name in spec.arguments]) for k in kink_expressions(derivation)]
    input_names = [i.name for i in spec.inputs]
    rows = []
    for quantity, function in truths.items():
        worst, worst_point, spurious = 0.0, {}, 0
        for j in range(len(points)):
            args = [points.values[name][j] if name in points.values else params[name] for name in spec.arguments]
            if skip is not None and skip(dict(zip(spec.arguments, args))):
                continue
            truth = evaluate(function, args)
            if truth is None or abs(truth) > LARGEST:
                continue  # no finite float64 truth to compare with
            for outputs in computed[quantity]:
                value = float(outputs[j])
                if not math.isfinite(value):
                    spurious += 1
                    error = math.inf
                else:
                    error = relative_error(value, truth)
                    if error > RELATIVE_TOLERANCE and _at_discontinuity(kinks, spec.arguments, args, input_names):
                        neighbours = _one_ulp_neighbours(function, spec.arguments, args, input_names)
                        error = min([error] + [relative_error(value, t) for t in neighbours if t is not None])
                if error > worst or (error == worst == math.inf and not worst_point):
                    worst, worst_point = error, dict(zip(spec.arguments, args))
        rows.append(Row(spec.name, quantity, len(points), worst, worst_point, spurious))
    return rows


def _neighbours(argument_names, args, input_names):
    """The argument lists with one input moved to a neighbouring float, each in turn."""
    for name in input_names:
        k = argument_names.index(name)
        for direction in (-np.inf, np.inf):
            shifted = list(args)
            shifted[k] = float(np.nextafter(args[k], direction))
            yield shifted


def _at_discontinuity(kinks, argument_names, args, input_names) -> bool:
    """True where a kink expression is 0 or changes sign between the point and a neighbouring
    float of an input: there, rounding may put a kernel on the other side of the kink."""
    here = [evaluate(kink, args) for kink in kinks]
    for shifted in _neighbours(argument_names, args, input_names):
        for kink, value in zip(kinks, here):
            there = evaluate(kink, shifted)
            if value is not None and there is not None and (value == 0 or (value > 0) != (there > 0)):
                return True
    return False


def _one_ulp_neighbours(function, argument_names, args, input_names):
    """The truth at the neighbouring floats of each input, for points at a discontinuity."""
    return [evaluate(function, shifted) for shifted in _neighbours(argument_names, args, input_names)]


def check_derivatives(derivation: Derivation, points: Points, params: dict[str, float],
                      kink_distance: float = 1e-6) -> list[Row]:
    """Symbolic gradient and Hessian against high-precision central differences of the loss
    (the Hessian: of the loss, second order), at points away from every kink."""
    spec = derivation.spec
    arguments = [spec.symbols[name] for name in spec.arguments]
    loss = mp_function(derivation.loss, arguments)
    kinks = [mp_function(k, arguments) for k in kink_expressions(derivation)]
    truths = truth_functions(derivation)
    rows = []
    for k, prediction in enumerate(spec.predictions):
        index = spec.arguments.index(prediction.name)
        worst = {"grad": (0.0, {}), "hess": (0.0, {})}
        checked = 0
        for j in np.flatnonzero(~points.near_kink):
            args = [points.values[name][j] if name in points.values else params[name] for name in spec.arguments]
            digits = _start_digits(args)
            with mpmath.workdps(digits):
                mp_args = [mpmath.mpf(float(a)) for a in args]
                if any(abs(kink(*mp_args)) < kink_distance for kink in kinks):
                    continue
                try:
                    value = loss(*mp_args)
                except (ZeroDivisionError, ValueError):
                    continue
                if not mpmath.isfinite(value) or abs(value) > LARGEST:
                    continue
            checked += 1
            for order, name in ((1, "grad"), (2, "hess")):
                symbolic = evaluate(truths[f"{name}[{prediction.name}]"], args)
                if symbolic is None:
                    continue
                # a derivative far smaller than the loss needs that many more digits
                ratio = abs(value) / abs(symbolic) if symbolic != 0 else mpmath.mpf(1)
                extra = int(min(max(mpmath.log10(ratio), 0), 600)) if ratio > 0 else 0
                with mpmath.workdps(digits + extra + CANCELLATION_DIGITS):
                    mp_args = [mpmath.mpf(float(a)) for a in args]

                    def along(t):
                        shifted = list(mp_args)
                        shifted[index] = t
                        return loss(*shifted)

                    numeric = mpmath.diff(along, mp_args[index], order)
                    scale = max(abs(numeric), mpmath.mpf(10) ** -300)
                    error = float(abs(symbolic - numeric) / scale)
                if error > worst[name][0]:
                    worst[name] = (error, dict(zip(spec.arguments, args)))
        for name in ("grad", "hess"):
            error, point = worst[name]
            rows.append(Row(spec.name, f"{name}[{prediction.name}] vs finite differences", checked, error, point, 0))
    return rows


def verify_loss(loss, derivation: Derivation, n: int = 200, seed: int = 0, stress: bool = False,
                skip=None) -> list[Row]:
    """Every kernel of ``loss`` against the truth, for each parameter set, at random points
    and (with ``stress``) on the stress grid of extreme values."""
    rows = []
    stressed = parameter_sets(derivation.spec, singled_out=False)  # singled-out values: random points
    for params in parameter_sets(derivation.spec):
        rows.extend(check_kernels(loss, derivation, sample_points(derivation, params, n=n, seed=seed), params, skip))
        if stress and params in stressed:
            rows.extend(check_kernels(loss, derivation, stress_points(derivation, params, seed=seed), params, skip))
    return _merge(rows)


def verify_derivatives(derivation: Derivation, n: int = 200, seed: int = 0) -> list[Row]:
    """The symbolic derivatives against finite differences, for each parameter set."""
    rows = []
    for params in parameter_sets(derivation.spec):
        rows.extend(check_derivatives(derivation, sample_points(derivation, params, n=n, seed=seed), params))
    return _merge(rows)


def _merge(rows: list[Row]) -> list[Row]:
    """Combine rows of the same (loss, output) over parameter sets: worst error, total points.
    The worst point holds the parameters, so the report shows the set it comes from."""
    merged: dict[tuple, Row] = {}
    for row in rows:
        key = (row.loss, row.output)
        if key not in merged:
            merged[key] = row
            continue
        m = merged[key]
        if row.max_error > m.max_error:
            m.max_error, m.worst = row.max_error, row.worst
        m.points += row.points
        m.spurious_nonfinite += row.spurious_nonfinite
    return list(merged.values())


def format_report(rows: list[Row], tolerance: float = RELATIVE_TOLERANCE) -> str:
    """The accuracy table printed by ``lossgen verify``."""
    header = f"{'loss':<22} {'output':<16} {'points':>6} {'max rel err':>11} {'nan/inf':>7}  worst point"
    lines = [header, "-" * len(header)]
    for row in rows:
        worst = ", ".join(f"{k}={v:.17g}" for k, v in row.worst.items()) if row.max_error > 0 else "-"
        flag = "" if row.ok(tolerance) else "  (known gap)" if row.in_known_gap else "  FAIL"
        lines.append(f"{row.loss:<22} {row.output:<16} {row.points:>6} {row.max_error:>11.2e} "
                     f"{row.spurious_nonfinite:>7}  {worst}{flag}")
    return "\n".join(lines)
