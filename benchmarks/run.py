"""Benchmark lossgen's generated kernels side by side with what a user would otherwise write.

    python benchmarks/run.py            # sizes 1e3, 1e5, 1e7; 7 runs each; start-up figures
    python benchmarks/run.py --quick    # sizes 1e3, 1e5; 3 runs; no whole-catalog generate
    python benchmarks/run.py --threshold  # serial vs parallel loop by size (for SERIAL_BELOW)

Every figure is a median over runs; in each run every contender is timed once, one after the
other, in this process, so that a busy machine slows all of them alike. Ratios are lossgen's
time divided by the peer's: below 1, lossgen is faster (0.25 = four times faster).

Peers: a hand-written fused Numba kernel of the same stable formula (kept here, `reference`;
`textbook` is the plain textbook formula where lossgen's is more careful), vectorised
NumPy, sympy.lambdify of the spec's derivatives, scikit-learn's sklearn._loss and PyTorch
autograd (optional: skipped with a note where not installed), and a one-pass memory-bandwidth
floor (reads the inputs, writes as many outputs, computes nothing). Every contender returns
loss, gradient and Hessian diagonal per element in new arrays, as lossgen's loss_grad_hess does,
except scikit-learn, which is compared on gradient_hessian against lossgen's grad_hess.

Each benchmark case is one entry of CASES. The row-wise case (softmax cross-entropy, 1e6 rows
x 10 classes; 1e5 rows with --quick) compares lossgen's loss_grad_hess with scikit-learn's two
calls, loss_gradient + gradient_hessian, in the gh/sklearn column.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Callable

# On a shared machine OpenMP's default active waiting makes every parallel launch (Numba's,
# scikit-learn's, PyTorch's alike) wait for a descheduled spinning thread, ~16 ms each; with
# passive waiting it costs microseconds. Set before any OpenMP runtime starts; yours wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numba  # noqa: E402
import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import lossgen  # noqa: E402
from lossgen import runtime  # noqa: E402

try:
    from sklearn._loss import loss as sklearn_loss
except ImportError:  # optional peer
    sklearn_loss = None
try:
    import torch
except ImportError:  # optional peer
    torch = None


# --- hand-written references: fused, one pass, the textbook stable formula -------------------

def _fused(body, cost):
    """A serial and a parallel one-pass kernel y, p -> (loss, grad, hess) from a scalar body,
    the serial one below lossgen's threshold for kernels of that ``cost`` (runtime.SERIAL_BELOW)."""
    scalar = numba.njit(inline="always", error_model="numpy")(body)

    @numba.njit(error_model="numpy")
    def serial(y, p, a, l, g, h):
        for i in range(y.shape[0]):
            l[i], g[i], h[i] = scalar(y[i], p[i], a)

    @numba.njit(parallel=True, error_model="numpy")
    def parallel(y, p, a, l, g, h):
        for i in numba.prange(y.shape[0]):
            l[i], g[i], h[i] = scalar(y[i], p[i], a)

    def run(y, p, a=0.0):
        l, g, h = np.empty_like(p), np.empty_like(p), np.empty_like(p)
        (serial if y.shape[0] < runtime.SERIAL_BELOW[cost] else parallel)(y, p, a, l, g, h)
        return l, g, h
    return run


def _mse(y, p, a):
    r = p - y
    return r * r, 2.0 * r, 2.0


def _mae(y, p, a):
    r = p - y
    s = 1.0 if r > 0 else (-1.0 if r < 0 else 0.0)
    return abs(r), s, 0.0


def _huber(y, p, delta):
    r = p - y
    if abs(r) < delta:
        return 0.5 * r * r, r, 1.0
    return delta * (abs(r) - 0.5 * delta), delta * (1.0 if r > 0 else -1.0), 0.0


def _pinball(y, p, tau):
    r = y - p
    if r > 0:
        return tau * r, -tau, 0.0
    if r < 0:
        return (tau - 1.0) * r, 1.0 - tau, 0.0
    return 0.0, 0.5 - tau, 0.0


def _poisson(y, p, a):
    e = math.exp(p)
    return e - y * p, e - y, e


def _logistic(y, x, a):
    # log(1 + exp(x)) - y x without overflow; sigmoid without overflow
    loss = max(x, 0.0) - x * y + math.log1p(math.exp(-abs(x)))
    if x >= 0:
        s = 1.0 / (1.0 + math.exp(-x))
    else:
        e = math.exp(x)
        s = e / (1.0 + e)
    return loss, s - y, s * (1.0 - s)


# The same stable formulas as lossgen's kernels (see generated/<name>.py), written by hand,
# computing per branch only what that branch needs; the helpers are lossgen's stable ones.
_helpers = lossgen.get("binary_cross_entropy_logits").module
_fma, _sigmoid_from, _softplus_from, _tanh_from = (
    _helpers._fma, _helpers._sigmoid_from, _helpers._softplus_from, _helpers._tanh_from)


def _poisson_stable(y, p, a):
    if abs(p) <= 1.0:  # exp(p) - y p = expm1(p) + (1 - y p), 1 - y p with an exact product
        e1 = math.expm1(p)
        return e1 + _fma(-p, y, 1.0), e1 + (1.0 - y), e1 + 1.0
    e = math.exp(p)
    return e - p * y, e - y, e


def _logistic_stable(y, x, w):
    # w = pos_weight: w y softplus(-x) + (1 - y) softplus(x)
    e = math.exp(-abs(x))  # one exp for both sigmoids and both softpluses
    s, t = _sigmoid_from(x, e), _sigmoid_from(-x, e)
    wy, ny = w * y, 1.0 - y
    hess = s * t * (wy - y + 1.0)
    tail = math.log1p(e)  # both softpluses' terms are >= 0: the loss needs no branch
    loss = wy * _softplus_from(-x, tail) + ny * _softplus_from(x, tail)
    if abs(x) <= 1.0:  # sigmoid(x) = 1/2 + tanh(x/2)/2: the gradient's 1/2 cancels exactly against y
        u = 0.5 * x
        big, small = _fma(y, w, ny), _fma(-y, w, ny)  # w y + (1 - y), (1 - y) - w y
        return loss, 0.5 * big * _tanh_from(u, math.expm1(abs(u))) + 0.5 * small, hess
    return loss, s * ny - t * wy, hess


_logistic_stable_scalar = numba.njit(inline="always", error_model="numpy")(_logistic_stable)


def _logistic_stable_default(y, x, a):
    # The benchmark calls lossgen at pos_weight's default, 1, where lossgen runs the kernels
    # specialised at it (the spec marks pos_weight `specialise`); so the reference has the 1 put
    # in at compile time too.
    return _logistic_stable_scalar(y, x, 1.0)


@numba.njit(error_model="numpy")
def _floor_serial(y, p, l, g, h):
    for i in range(y.shape[0]):
        l[i], g[i], h[i] = y[i], p[i], y[i]


@numba.njit(parallel=True, error_model="numpy")
def _floor_parallel(y, p, l, g, h):
    for i in numba.prange(y.shape[0]):
        l[i], g[i], h[i] = y[i], p[i], y[i]


def bandwidth_floor(y, p):
    """Reads the two inputs and writes three new outputs, nothing else: the least that a fused
    loss_grad_hess must move through memory (same serial/parallel choice as lossgen's arithmetic
    kernels)."""
    l, g, h = np.empty_like(p), np.empty_like(p), np.empty_like(p)
    (_floor_serial if y.shape[0] < runtime.SERIAL_BELOW["arithmetic"] else _floor_parallel)(y, p, l, g, h)
    return l, g, h


# --- row-wise: softmax cross-entropy on logits s (N, C) against class indices y (N,) ----------

def _softmax_rows(stable):
    """A serial and a parallel fused kernel: per row one pass for the max, one for the sum of
    exponentials, one writing loss, gradient and Hessian diagonal. ``stable``: lossgen's formula
    (logsumexp as M + L, L = log1p(S), S the sum of exp(s_k - M) over the others, each exp kept
    in a scratch row; p_k = exp(s_k - M)/(1 + S), and 1 - p_k as S/(1 + S) at the arg-max, by
    subtraction elsewhere); else the textbook one (p = e_k / sum, 1 - p by subtraction)."""

    def body(y, s, l, g, h, i, e):
        c = s.shape[1]
        m, a = s[i, 0], 0
        for k in range(1, c):
            if s[i, k] > m:
                m, a = s[i, k], k
        total = 0.0
        for k in range(c):
            e[k] = math.exp(s[i, k] - m)
            if k != a or not stable:
                total += e[k]
        target = y[i]
        if stable:
            tail, inverse = math.log1p(total), 1.0 / (1.0 + total)
            rest = total * inverse
            l[i] = (m - s[i, target]) + tail
            for k in range(c):
                p = e[k] * inverse
                q = rest if k == a else 1.0 - p
                g[i, k] = -q if k == target else p
                h[i, k] = p * q
        else:
            l[i] = m + math.log(total) - s[i, target]
            for k in range(c):
                p = e[k] / total
                g[i, k] = p - 1.0 if k == target else p
                h[i, k] = p * (1.0 - p)

    row = numba.njit(inline="always", error_model="numpy")(body)

    @numba.njit(error_model="numpy")
    def serial(y, s, l, g, h):
        e = np.empty(s.shape[1])
        for i in range(s.shape[0]):
            row(y, s, l, g, h, i, e)

    @numba.njit(parallel=True, error_model="numpy")
    def parallel(y, s, l, g, h):
        n = s.shape[0]
        for b in numba.prange((n + 255) // 256):  # one scratch row per block of 256 rows
            e = np.empty(s.shape[1])
            for i in range(b * 256, min(n, b * 256 + 256)):
                row(y, s, l, g, h, i, e)

    def run(y, s):
        l, g, h = np.empty(s.shape[0]), np.empty_like(s), np.empty_like(s)
        (serial if s.size < runtime.SERIAL_BELOW["row"] else parallel)(y, s, l, g, h)
        return l, g, h
    return run


@numba.njit(error_model="numpy")
def _floor_rows_serial(y, s, l, g, h):
    for i in range(s.shape[0]):
        l[i] = y[i]
        for k in range(s.shape[1]):
            g[i, k] = s[i, k]
            h[i, k] = s[i, k]


@numba.njit(parallel=True, error_model="numpy")
def _floor_rows_parallel(y, s, l, g, h):
    for i in numba.prange(s.shape[0]):
        l[i] = y[i]
        for k in range(s.shape[1]):
            g[i, k] = s[i, k]
            h[i, k] = s[i, k]


def bandwidth_floor_rows(y, s):
    """Reads labels and logits, writes a loss per row and a gradient and a Hessian diagonal."""
    l, g, h = np.empty(s.shape[0]), np.empty_like(s), np.empty_like(s)
    (_floor_rows_serial if s.size < runtime.SERIAL_BELOW["row"] else _floor_rows_parallel)(y, s, l, g, h)
    return l, g, h


def _np_softmax_ce(y, s):
    m = s.max(axis=1, keepdims=True)
    e = np.exp(s - m)
    total = e.sum(axis=1, keepdims=True)
    p = e / total
    rows = np.arange(s.shape[0])
    loss = (m[:, 0] + np.log(total[:, 0])) - s[rows, y]
    grad = p.copy()
    grad[rows, y] -= 1.0
    return loss, grad, p * (1.0 - p)


def _class_inputs(rng, n, classes=10):
    return rng.integers(0, classes, size=n), rng.normal(scale=2.0, size=(n, classes))


# --- vectorised NumPy ---------------------------------------------------------------------

def _np_mse(y, p):
    r = p - y
    return r * r, 2.0 * r, np.full_like(r, 2.0)


def _np_mae(y, p):
    r = p - y
    return np.abs(r), np.sign(r), np.zeros_like(r)


def _np_huber(y, p, delta=1.0):
    r = p - y
    a = np.abs(r)
    inside = a < delta
    return (np.where(inside, 0.5 * r * r, delta * (a - 0.5 * delta)),
            np.where(inside, r, delta * np.sign(r)), inside.astype(r.dtype))


def _np_pinball(y, p, tau=0.9):
    r = y - p
    return (np.maximum(tau * r, (tau - 1.0) * r),
            np.where(r > 0, -tau, np.where(r < 0, 1.0 - tau, 0.5 - tau)), np.zeros_like(r))


def _np_poisson(y, p):
    e = np.exp(p)
    return e - y * p, e - y, e


def _np_logistic(y, x):
    s = np.where(x >= 0, 1.0 / (1.0 + np.exp(-np.abs(x))), np.exp(-np.abs(x)) / (1.0 + np.exp(-np.abs(x))))
    return np.logaddexp(0.0, x) - y * x, s - y, s * (1.0 - s)


# --- the cases -------------------------------------------------------------------------------

def _regression_inputs(rng, n):
    return rng.normal(size=n), rng.normal(size=n)


def _count_inputs(rng, n):
    return rng.poisson(3.0, size=n).astype(np.float64), rng.normal(scale=1.5, size=n)


def _positive_inputs(rng, n):
    return rng.uniform(0.0, 5.0, size=n), rng.uniform(0.0, 5.0, size=n)


def _label_inputs(rng, n):
    return rng.integers(0, 2, size=n).astype(np.float64), rng.normal(scale=3.0, size=n)


@dataclass
class Case:
    """One loss as benchmarked: lossgen's name and parameters, how to make inputs, and each peer."""
    name: str                        # lossgen loss
    params: dict
    inputs: Callable                 # (rng, n) -> arrays in the spec's order
    reference: Callable              # hand-written fused Numba: arrays -> (loss, grad, hess)
    numpy: Callable                  # vectorised NumPy: arrays -> (loss, grad, hess)
    torch_loss: Callable | None      # (y, p) tensors -> per-element loss
    sklearn: Callable | None = None  # () -> sklearn._loss object with the same loss (up to scale)
    sklearn_note: str = ""
    memory_bound: bool = False       # target: <= 1.3x the bandwidth floor
    sizes: tuple | None = None       # None: the run's sizes (a row-wise case names its own)
    textbook: Callable | None = None  # hand-written textbook formula, where lossgen's is more careful
    rowwise: bool = False            # arrays: labels (N,), logits (N, C); sklearn is timed on
                                     # loss_gradient + gradient_hessian against lossgen's loss_grad_hess
    floor: Callable | None = None    # the bandwidth floor for this case's shapes (None: elementwise)


def _torch_pinball(tau):
    def loss(y, p):
        r = y - p
        return torch.maximum(tau * r, (tau - 1.0) * r)
    return loss


def _cases() -> list[Case]:
    F = torch.nn.functional if torch else None
    sk = sklearn_loss
    return [
        Case("mse", {}, _regression_inputs, _fused(_mse, "arithmetic"), _np_mse,
             F and (lambda y, p: F.mse_loss(p, y, reduction="none")),
             sk and sk.HalfSquaredError, "HalfSquaredError: (p-y)^2/2, half ours", memory_bound=True),
        Case("mae", {}, _regression_inputs, _fused(_mae, "arithmetic"), _np_mae,
             F and (lambda y, p: F.l1_loss(p, y, reduction="none")),
             sk and sk.AbsoluteError, "AbsoluteError: Hessian returned as 1s", memory_bound=True),
        Case("huber", {"delta": 1.0}, _regression_inputs,
             (lambda y, p, f=_fused(_huber, "arithmetic"): f(y, p, 1.0)), _np_huber,
             F and (lambda y, p: F.huber_loss(p, y, reduction="none", delta=1.0)),
             sk and (lambda: sk.HuberLoss(delta=1.0)), "HuberLoss(delta=1): same", memory_bound=True),
        Case("quantile", {"tau": 0.9}, _regression_inputs,
             (lambda y, p, f=_fused(_pinball, "arithmetic"): f(y, p, 0.9)), _np_pinball, F and _torch_pinball(0.9),
             sk and (lambda: sk.PinballLoss(quantile=0.9)), "PinballLoss(0.9): Hessian returned as 1s"),
        Case("poisson", {}, _count_inputs, _fused(_poisson_stable, "libm"), _np_poisson,
             F and (lambda y, p: F.poisson_nll_loss(p, y, log_input=True, full=False, reduction="none")),
             sk and sk.HalfPoissonLoss, "HalfPoissonLoss: exp(p) - y p, same", textbook=_fused(_poisson, "libm")),
        Case("binary_cross_entropy_logits", {}, _label_inputs,
             _fused(_logistic_stable_default, "libm"), _np_logistic,
             F and (lambda y, x: F.binary_cross_entropy_with_logits(x, y, reduction="none")),
             sk and sk.HalfBinomialLoss, "HalfBinomialLoss: same", textbook=_fused(_logistic, "libm")),
        # row-wise, 1e6 rows x 10 classes; target: <= 0.5x scikit-learn's multinomial
        # loss_gradient + gradient_hessian (two passes that lossgen's loss_grad_hess does in one)
        Case("softmax_cross_entropy", {}, _class_inputs, _softmax_rows(True), _np_softmax_ce,
             F and (lambda y, s: F.cross_entropy(s, y, reduction="none")),
             sk and (lambda: sk.HalfMultinomialLoss(n_classes=10)),
             "HalfMultinomialLoss: same; n counts rows of 10 classes; its gh/sklearn cell is lossgen loss_grad_hess / (sklearn loss_gradient + gradient_hessian)",
             sizes=(1_000_000,), textbook=_softmax_rows(False), rowwise=True, floor=bandwidth_floor_rows),
    ]


# --- contenders ---------------------------------------------------------------------------

def _lambdified(case: Case):
    """sympy.lambdify of the spec's own loss, gradient and Hessian (one function, with CSE)."""
    import sympy as sp

    from lossgen.derive import derive
    from lossgen.paths import SPECS_DIR
    from lossgen.spec import find_spec_files, load_spec
    path = next(p for p in find_spec_files(SPECS_DIR) if p.stem == case.name)
    spec = load_spec(path)
    d = derive(spec)
    symbols = [sp.Symbol(i.name) for i in spec.inputs] + [sp.Symbol(p.name) for p in spec.params]
    exprs = [d.loss, d.grad[0], d.hess[0]]  # symbols are matched by name
    helpers = {"sigmoid": lambda x: 1.0 / (1.0 + np.exp(-x)), "softplus": lambda x: np.logaddexp(0.0, x)}
    function = sp.lambdify(symbols, exprs, modules=[helpers, "numpy"], cse=True)
    values = [case.params.get(p.name, p.default) for p in spec.params]

    def run(*arrays):
        return [np.broadcast_to(v, arrays[0].shape) for v in function(*arrays, *values)]
    return run


def _torch_autograd(case: Case):
    threads = numba.get_num_threads()
    torch.set_num_threads(threads)
    if case.rowwise:
        return _torch_autograd_rows(case)

    def run(y, p):
        yt, pt = torch.from_numpy(y), torch.from_numpy(p).requires_grad_(True)
        loss = case.torch_loss(yt, pt)
        grad, = torch.autograd.grad(loss.sum(), pt, create_graph=True)
        hess = torch.autograd.grad(grad.sum(), pt)[0] if grad.requires_grad else torch.zeros_like(pt)
        return loss.numpy(force=True), grad.numpy(force=True), hess.numpy(force=True)  # force: ZeroTensor
    return run


def _torch_autograd_rows(case: Case):
    """Loss per row, gradient, and the Hessian's diagonal: one more backward pass per class."""
    def run(y, s):
        yt, st = torch.from_numpy(y), torch.from_numpy(s).requires_grad_(True)
        loss = case.torch_loss(yt, st)
        grad, = torch.autograd.grad(loss.sum(), st, create_graph=True)
        hess = torch.empty_like(st)
        for k in range(s.shape[1]):
            hess[:, k] = torch.autograd.grad(grad[:, k].sum(), st, retain_graph=True)[0][:, k]
        return loss.numpy(force=True), grad.numpy(force=True), hess.numpy(force=True)
    return run


def _sklearn_contender(case: Case):
    loss = case.sklearn()
    threads = numba.get_num_threads()
    if case.rowwise:
        labels = {}  # sklearn takes class labels as floats: converted once per input array

        def run_rows(y, s):
            if id(y) not in labels:
                labels.clear()
                labels[id(y)] = (y, y.astype(np.float64))
            y_float = labels[id(y)][1]
            value, grad = loss.loss_gradient(y_float, s, n_threads=threads)
            grad, hess = loss.gradient_hessian(y_float, s, n_threads=threads)
            return value, grad, hess
        return run_rows

    def run(y, p):
        return loss.gradient_hessian(y, p, n_threads=threads)
    return run


def contenders(case: Case, notes: list) -> dict[str, Callable]:
    """name -> function of the case's arrays; the first two are lossgen's."""
    loss = lossgen.get(case.name)
    run = {
        "lossgen": lambda *a: loss.loss_grad_hess(*a, **case.params),
        "lossgen grad_hess": lambda *a: loss.grad_hess(*a, **case.params),
        "reference": case.reference,
        "textbook": case.textbook or case.reference,
        "floor": case.floor or bandwidth_floor,
        "numpy": case.numpy,
    }
    if case.rowwise:
        notes.append(f"{case.name}: no lambdify column (row reductions have no elementwise lambdify)")
    else:
        run["lambdify"] = _lambdified(case)
    if case.torch_loss is None:
        notes.append(f"{case.name}: PyTorch not installed (pip install torch) or left out (--no-torch): torch column skipped")
    else:
        run["torch"] = _torch_autograd(case)
    if case.sklearn is None:
        if sklearn_loss is None:
            notes.append(f"{case.name}: scikit-learn not installed (pip install scikit-learn): sklearn column skipped")
    else:
        run["sklearn"] = _sklearn_contender(case)
    return run


# --- timing --------------------------------------------------------------------------------

def _calls_per_run(function, arrays, budget=0.004) -> int:
    """Enough calls that one timed run takes about ``budget`` seconds (at least 1)."""
    started = time.perf_counter()
    function(*arrays)
    once = time.perf_counter() - started
    return max(1, min(20_000, int(budget / max(once, 1e-7))))


def time_side_by_side(functions: dict, arrays, repeats: int) -> dict[str, float]:
    """Median seconds per call of each function; each run times every function once, in turn,
    starting one further along the list than the run before, so that no contender always comes
    first (right after the slowest peer freed its arrays) or last."""
    for function in functions.values():
        function(*arrays)  # compile, warm caches
    calls = {name: _calls_per_run(f, arrays) for name, f in functions.items()}
    samples = {name: [] for name in functions}
    names = list(functions)
    for index in range(repeats):
        start = index % len(names)
        for name in names[start:] + names[:start]:
            function = functions[name]
            started = time.perf_counter()
            for _ in range(calls[name]):
                function(*arrays)
            samples[name].append((time.perf_counter() - started) / calls[name])
    return {name: statistics.median(times) for name, times in samples.items()}


# How closely each peer must agree with lossgen (relative): the hand-written reference computes
# the same stable formula; the others the plain one, which loses digits where it cancels (the
# spec's raw Hessian of binary cross-entropy on logits divides by (1 - sigmoid(x))**2: 1e-6 at
# x = 11.6, 8e-4 at x = 15.1). For them the check only makes sure the same loss is timed: a
# wrong formula or a missing factor is off by far more than 1e-2.
AGREEMENT = {"reference": 1e-9, "textbook": 1e-2, "numpy": 1e-2, "lambdify": 1e-2, "torch": 1e-2}


def check_agreement(case: Case, functions: dict, arrays):
    """The contenders compute the same thing (up to the documented scale of sklearn's halves)."""
    ours = functions["lossgen"](*arrays)
    for name, rtol in AGREEMENT.items():
        if name in functions:
            theirs = functions[name](*arrays)
            for a, b, what in zip(ours, theirs, ("loss", "grad", "hess")):
                if not np.allclose(a, np.asarray(b, dtype=np.float64), rtol=rtol, atol=1e-12):
                    raise AssertionError(f"{case.name}: {name} disagrees with lossgen on the {what}")


# --- start-up figures --------------------------------------------------------------------------

LAZY_PROBE = """
import sys, time
started = time.perf_counter()
import numpy as np, lossgen
huber = lossgen.get("huber")
y = np.zeros(1000); p = np.ones(1000)
huber.grad_hess(y, p)
elapsed = time.perf_counter() - started
loaded = sorted(m.rsplit(".", 1)[-1] for m in sys.modules if m.startswith("_lossgen_kernels_") and "." in m)
compiled = sorted(k for k in huber.module.SPEC["kernels"]
                  if any(getattr(huber.module, k + suffix).signatures for suffix in ("_kernel", "_kernel_parallel")))
print(elapsed, ",".join(loaded), ",".join(compiled))
"""

# Numba imports scipy.linalg (for its BLAS bindings) when it sets up its CPU target, on the
# first kernel it compiles or loads, where SciPy is installed. The base install (pip install -e .)
# has no SciPy; a probe run after this line sees none either.
WITHOUT_SCIPY = "import sys; sys.modules['scipy'] = None\n"

# The same fresh process without lossgen: NumPy, Numba and one trivial cached kernel. Numba
# imports its typing and lowering registries on the first kernel it loads, whatever the kernel:
# the floor of any Numba-based library's first call.
NUMBA_FLOOR_PROBE = """
import time
started = time.perf_counter()
import numpy as np, numba
import trivial_kernel
trivial_kernel.copy(np.zeros(1000), np.empty(1000))
print(time.perf_counter() - started)
"""

TRIVIAL_KERNEL = """
import numba

@numba.njit(cache=True)
def copy(x, out):
    for i in range(x.shape[0]):
        out[i] = x[i]
"""


def _timed(command, **kwargs) -> tuple[float, str]:
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, **kwargs)
    if result.returncode:
        raise RuntimeError(f"{' '.join(map(str, command))} failed:\n{result.stdout}\n{result.stderr}")
    return time.perf_counter() - started, result.stdout


def _fresh_process(code: str, cwd, runs: int = 5) -> tuple[float, str]:
    """Median wall time of ``runs`` new Pythons running ``code`` (after one that warms Numba's
    disk cache and Python's bytecode cache), and the last one's output. PYTHONDONTWRITEBYTECODE
    is left out of their environment: with it (as on some CI machines) every process compiles
    lossgen's and the loss module's source again, which a user's Python does once."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    _timed([sys.executable, "-c", code], cwd=cwd, env=env)
    timed = [_timed([sys.executable, "-c", code], cwd=cwd, env=env) for _ in range(runs)]
    return statistics.median(t for t, _ in timed), timed[-1][1]


def startup_figures(quick: bool) -> list[tuple[str, str, str]]:
    """(what, figure, target) rows: generate cold and unchanged, --check, import + one call."""
    rows = []
    lossgen_cli = [sys.executable, "-m", "lossgen"]
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "generated"
        if quick:
            shutil.copytree(ROOT / "generated", out, ignore=shutil.ignore_patterns("__pycache__"))
            rows.append(("lossgen generate, whole catalog, cold", "skipped (--quick)", "< 60 s"))
        else:
            seconds, _ = _timed(lossgen_cli + ["generate", "--out", str(out)], cwd=ROOT)
            rows.append(("lossgen generate, whole catalog, cold", f"{seconds:.1f} s", "< 60 s"))
        seconds, _ = _timed(lossgen_cli + ["generate", "--out", str(out)], cwd=ROOT)  # fills the cache
        runs = [_timed(lossgen_cli + ["generate", "--out", str(out)], cwd=ROOT)[0] for _ in range(3)]
        rows.append(("lossgen generate, specs unchanged (median of 3)", f"{statistics.median(runs):.2f} s", "< 5 s"))
        runs = [_timed(lossgen_cli + ["generate", "--check", "--out", str(out)], cwd=ROOT)[0] for _ in range(3)]
        rows.append(("lossgen generate --check, unchanged (median of 3)", f"{statistics.median(runs):.2f} s", ""))
    whole, inside = _fresh_process(LAZY_PROBE, ROOT)
    after_start, loaded, compiled = inside.split()
    rows.append(("fresh process: start, import lossgen, huber.grad_hess (warm cache, median of 5)",
                 f"{whole:.2f} s ({float(after_start):.2f} s after start-up)", "< 1 s"))
    rows.append(("  the same without SciPy (as the base install: Numba skips scipy.linalg)",
                 f"{_fresh_process(WITHOUT_SCIPY + LAZY_PROBE, ROOT)[0]:.2f} s", "< 1 s"))
    with tempfile.TemporaryDirectory() as folder:
        Path(folder, "trivial_kernel.py").write_text(TRIVIAL_KERNEL)
        floor, _ = _fresh_process(WITHOUT_SCIPY + NUMBA_FLOOR_PROBE, folder)
    rows.append(("  Numba's floor: NumPy, Numba, one trivial cached kernel, without SciPy",
                 f"{floor:.2f} s", ""))
    rows.append(("lazy: loss modules imported / kernels compiled after that call",
                 f"{loaded} / {compiled}", "huber / grad_hess"))
    return rows


# --- per-call overhead ---------------------------------------------------------------------

def overhead_figures(repeats: int) -> list[tuple[str, str, str]]:
    """At 1e3 elements: the API call, the bare kernel call, and their difference."""
    huber = lossgen.get("huber")
    rng = np.random.default_rng(0)
    y, p = rng.normal(size=(2, 1000))
    outs = [np.empty(1000) for _ in range(3)]
    kernel = huber.module.loss_grad_hess_kernel
    functions = {
        "loss (mean)": lambda: huber.loss(y, p),
        "grad_hess": lambda: huber.grad_hess(y, p),
        "loss_grad_hess": lambda: huber.loss_grad_hess(y, p),
        "loss_grad_hess, delta=2.0": lambda: huber.loss_grad_hess(y, p, delta=2.0),
        "loss_grad_hess, out=": lambda: huber.loss_grad_hess(y, p, out=given),
        "bare loss_grad_hess_kernel": lambda: kernel(y, p, 1.0, None, *outs),
    }
    given = tuple(np.empty(1000) for _ in range(3))
    times = time_side_by_side({k: (lambda f=f: f()) for k, f in functions.items()}, (), max(repeats, 21))
    bare = times["bare loss_grad_hess_kernel"]
    rows = []
    for name, seconds in times.items():
        extra = "" if name.startswith("bare") else f" (Python side {1e6 * (seconds - bare):.1f} us)"
        rows.append((f"huber.{name} at 1e3" if not name.startswith("bare") else f"{name} at 1e3",
                     f"{1e6 * seconds:.1f} us{extra}", "< 20 us" if not name.startswith("bare") else ""))
    # at 1e5 the outputs' first writes (page faults of new arrays) can cost more than the kernel
    y, p = rng.normal(size=(2, 100_000))
    given = tuple(np.empty(100_000) for _ in range(3))
    times = time_side_by_side({"new": lambda: huber.loss_grad_hess(y, p),
                               "out=": lambda: huber.loss_grad_hess(y, p, out=given)}, (), max(repeats, 21))
    rows.append(("huber.loss_grad_hess at 1e5: new outputs / into out=",
                 f"{1e6 * times['new']:.0f} / {1e6 * times['out=']:.0f} us", ""))
    return rows


# --- serial/parallel threshold -------------------------------------------------------------

def threshold_table(repeats: int):
    """Serial and parallel loops of grad_hess by size, for picking runtime.SERIAL_BELOW: per
    cost class of the kernels (the generator's mark, SPEC["costs"]), the threshold that keeps
    the worst slowdown (against the faster loop) smallest over that class's losses."""
    print(f"serial vs parallel grad_hess kernel, {numba.get_num_threads()} threads (median of {repeats})")
    print(f"{'loss':<30}{'cost':>12}{'n':>10}{'serial us':>12}{'parallel us':>13}{'par/ser':>9}")
    sizes = (1_000, 3_000, 10_000, 30_000, 50_000, 100_000, 300_000, 1_000_000)
    ratios = {}
    for name, make in (("mse", _regression_inputs), ("huber", _regression_inputs),
                       ("poisson", _count_inputs), ("binary_cross_entropy_logits", _label_inputs),
                       ("msle", _positive_inputs), ("barron", _regression_inputs)):
        loss = lossgen.get(name)
        serial, parallel, cost = runtime.kernel_launchers(loss.module, "grad_hess")
        params = loss._defaults
        for n in sizes:
            y, p = make(np.random.default_rng(1), n)
            g, h = np.empty(n), np.empty(n)
            times = time_side_by_side({
                "serial": lambda: serial(y, p, *params, None, g, h),
                "parallel": lambda: parallel(y, p, *params, None, g, h)}, (), repeats)
            ratios[cost, n] = ratios.get((cost, n), []) + [times["parallel"] / times["serial"]]
            print(f"{name:<30}{cost:>12}{n:>10}{1e6 * times['serial']:>12.1f}{1e6 * times['parallel']:>13.1f}"
                  f"{ratios[cost, n][-1]:>9.2f}", flush=True)

    candidates = sizes + (sizes[-1] * 3,)
    for cost in sorted({c for c, _ in ratios}):
        def worst(threshold):  # slowdown against the faster loop, over the class's losses and sizes
            return max(max(r, 1.0) if n >= threshold else max(1.0 / r, 1.0)
                       for (c, n), rs in ratios.items() if c == cost for r in rs)
        best = min(candidates, key=worst)
        print(f"{cost}: worst slowdown by threshold: " + ", ".join(f"{t}: {worst(t):.2f}" for t in candidates))
        print(f"{cost}: smallest worst slowdown: serial below {best} "
              f"(runtime.SERIAL_BELOW[{cost!r}] is {runtime.SERIAL_BELOW[cost]})")


# --- the table ------------------------------------------------------------------------------

COLUMNS = [  # (heading, contender whose time divides lossgen's, lossgen's function, target)
    ("/ref", "reference", "lossgen", "<= 1.1"),
    ("/textbook", "textbook", "lossgen", ""),
    ("/floor", "floor", "lossgen", "<= 1.3 (mse, mae, huber)"),
    ("/numpy", "numpy", "lossgen", ""),
    ("/lambdify", "lambdify", "lossgen", "<= 0.2"),
    ("/torch", "torch", "lossgen", "<= 0.33"),
    ("gh/sklearn", "sklearn", "lossgen grad_hess", "<= 1.0"),
]


def _mine(case: Case, peer: str, mine: str) -> str:
    """lossgen's contender against ``peer``: for a row-wise loss scikit-learn's two calls
    (loss_gradient + gradient_hessian) face lossgen's one fused loss_grad_hess."""
    return "lossgen" if case.rowwise and peer == "sklearn" else mine


def _size_text(n: int) -> str:
    exponent = int(round(math.log10(n)))
    return f"1e{exponent}" if 10 ** exponent == n else str(n)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="sizes 1e3 and 1e5, 3 runs, no cold generate")
    parser.add_argument("--sizes", type=float, nargs="+", help="element counts (default 1e3 1e5 1e7)")
    parser.add_argument("--repeats", type=int, help="runs per figure (default 7; --quick 3)")
    parser.add_argument("--cases", nargs="+", help="only these losses")
    parser.add_argument("--no-startup", action="store_true", help="skip the generate and start-up figures")
    parser.add_argument("--threshold", action="store_true", help="only the serial/parallel table")
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument("--no-torch", action="store_true",
                        help="leave PyTorch out of the rotation (once its autograd has run in the process, "
                             "scikit-learn's multinomial loss took about twice as long)")
    args = parser.parse_args(argv)
    repeats = args.repeats or (3 if args.quick else 7)
    sizes = [int(s) for s in (args.sizes or ([1e3, 1e5] if args.quick else [1e3, 1e5, 1e7]))]
    if args.threshold:
        threshold_table(repeats)
        return 0

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"lossgen benchmark, {date.today().isoformat()}: {platform.machine()}, {os.cpu_count()} CPUs, "
          f"load average {load:.1f}; Numba {numba.__version__} on {numba.get_num_threads()} threads; "
          f"NumPy {np.__version__}; OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}; "
          f"serial loop below {', '.join(f'{n} elements ({c})' for c, n in runtime.SERIAL_BELOW.items())}")
    print(f"medians of {repeats} runs, side by side; ratio = lossgen time / peer time (below 1: lossgen faster)")
    notes, results = [], []
    if args.no_torch:
        global torch
        torch = None  # _cases() then gives no PyTorch contender
    cases = [c for c in _cases() if not args.cases or c.name in args.cases]
    header = f"{'loss':<28}{'n':>5}{'lgh us':>11}{'gh us':>10}" + "".join(f"{h:>11}" for h, *_ in COLUMNS)
    print(header)
    print("-" * len(header))
    for case in cases:
        functions = contenders(case, notes)
        case_sizes = case.sizes or sizes
        if args.quick and case.rowwise:
            case_sizes = tuple(n // 10 for n in case_sizes)
        for n in case_sizes:
            arrays = case.inputs(np.random.default_rng(n), n)
            if n == case_sizes[0]:
                check_agreement(case, functions, arrays)
            times = time_side_by_side(functions, arrays, repeats)
            ratios = {h: times[_mine(case, of, mine)] / times[of] for h, of, mine, _ in COLUMNS if of in times}
            results.append({"loss": case.name, "n": n, "seconds": times, "ratios": ratios})
            cells = "".join(f"{ratios[h]:>11.2f}" if h in ratios else f"{'-':>11}" for h, *_ in COLUMNS)
            print(f"{case.name[:27]:<28}{_size_text(n):>5}{1e6 * times['lossgen']:>11.1f}"
                  f"{1e6 * times['lossgen grad_hess']:>10.1f}{cells}", flush=True)
        if case.sklearn_note and "sklearn" in functions:
            notes.append(f"{case.name}: sklearn {case.sklearn_note}")
    print("targets: " + "; ".join(f"{h} {t}" for h, _, _, t in COLUMNS if t))
    print("lgh us / gh us: lossgen's loss_grad_hess / grad_hess per call, microseconds, inputs to new outputs")
    for note in notes:
        print(f"note: {note}")
    print(f"note: Numba threading layer {numba.threading_layer()}; scikit-learn and PyTorch run on as many threads")

    figures = overhead_figures(repeats)
    if not args.no_startup:
        figures += startup_figures(args.quick)
    width = max(len(w) for w, _, _ in figures)
    print()
    for what, figure, target in figures:
        print(f"{what:<{width}}  {figure:<34} {('target ' + target) if target else ''}")
    if args.json:
        Path(args.json).write_text(json.dumps({"results": results, "figures": figures}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
