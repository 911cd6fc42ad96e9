"""Plumbing for speed that must not change results: generation skips specs whose inputs are
unchanged (and still regenerates when lossgen's source or templates change), the runtime's
fast argument path validates as the full one, kernels pick a serial or a parallel loop by
size and thread settings, and both loops give the same numbers. No timings are asserted here
(benchmarks/run.py measures them)."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import types

import mpmath
import numba
import numpy as np
import pytest
import sympy as sp

import lossgen
from lossgen import generate as generation
from lossgen import runtime
from lossgen.emit import NumbaPrinter, code_form, kernel_code, kernel_cost, kernel_vectorises, scoped_code
from lossgen.paths import SPECS_DIR
from lossgen.runtime_rows import RowLoss
from lossgen.spec import load_spec
from lossgen.vocabulary import logcosh, sigmoid, softplus

X = sp.Symbol("x", real=True)

# --- generate: skip unchanged specs by content hash ----------------------------------------


@pytest.fixture(autouse=True)
def _private_render_cache(tmp_path, monkeypatch):
    monkeypatch.setenv(generation.CACHE_VARIABLE, str(tmp_path / "render-cache"))


def _project(tmp_path):
    specs = tmp_path / "specs" / "regression"
    specs.mkdir(parents=True)
    (specs / "mse.toml").write_text((SPECS_DIR / "regression" / "mse.toml").read_text())
    return tmp_path / "specs", tmp_path / "kernels"


def _snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.py"))}


def _generate(specs, out, **kwargs):
    return generation.generate(specs, out, log=lambda line: None, **kwargs)


def _forbid_rendering(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("a spec with unchanged inputs was rendered again")
    monkeypatch.setattr(generation, "build_module", fail)


def test_rerun_with_unchanged_specs_skips_rendering_and_keeps_bytes(tmp_path, monkeypatch):
    specs, out = _project(tmp_path)
    assert _generate(specs, out) == 0
    first = _snapshot(out)
    _forbid_rendering(monkeypatch)
    assert _generate(specs, out) == 0
    assert _generate(specs, out, check=True) == 0
    assert _snapshot(out) == first


def test_changed_spec_is_rendered_again(tmp_path, monkeypatch):
    specs, out = _project(tmp_path)
    assert _generate(specs, out) == 0
    spec = specs / "regression" / "mse.toml"
    spec.write_text(spec.read_text().replace("(p - y)**2", "2*(p - y)**2"))
    rendered = []
    original = generation.build_module
    monkeypatch.setattr(generation, "build_module", lambda *a: rendered.append(a) or original(*a))
    assert _generate(specs, out, check=True) == 1  # stale, found without the cache's help
    assert _generate(specs, out) == 0
    assert len(rendered) == 2
    assert "2.0*" in (out / "mse.py").read_text()


def test_change_to_lossgen_source_or_templates_renders_again(tmp_path, monkeypatch):
    specs, out = _project(tmp_path)
    assert _generate(specs, out) == 0
    source = tmp_path / "lossgen_copy"
    source.mkdir()
    (source / "stabilise.py").write_text("RULES = []\n")
    templates = tmp_path / "templates_copy"
    templates.mkdir()
    (templates / "loss_module.py.j2").write_text("{{ spec.name }}\n")
    monkeypatch.setattr(generation, "PACKAGE_DIR", source)
    monkeypatch.setattr(generation, "TEMPLATES_DIR", templates)
    before = generation.pipeline_fingerprint()
    (source / "stabilise.py").write_text("RULES = ['a changed rule']\n")
    after_source = generation.pipeline_fingerprint()
    (templates / "loss_module.py.j2").write_text("{{ spec.title }}\n")
    after_template = generation.pipeline_fingerprint()
    assert len({before, after_source, after_template}) == 3

    # a different fingerprint (as after such a change) renders the module again
    rendered = []
    original = generation.build_module
    monkeypatch.setattr(generation, "build_module", lambda *a: rendered.append(a) or original(*a))
    assert _generate(specs, out) == 0
    assert len(rendered) == 1


def test_hand_edited_module_is_stale_for_check_and_rewritten(tmp_path, monkeypatch):
    specs, out = _project(tmp_path)
    assert _generate(specs, out) == 0
    first = _snapshot(out)
    (out / "mse.py").write_text((out / "mse.py").read_text() + "# edited\n")
    assert _generate(specs, out, check=True) == 1
    assert _generate(specs, out) == 0
    assert _snapshot(out) == first


def test_missing_or_corrupt_cache_only_costs_time(tmp_path):
    specs, out = _project(tmp_path)
    assert _generate(specs, out) == 0
    first = _snapshot(out)
    assert sorted(p.name for p in out.iterdir()) == ["__init__.py", "mse.py"]  # nothing else in there
    cache = generation.cache_file(out)
    assert set(json.loads(cache.read_text())["modules"]) == {"mse.py"}
    cache.write_text("{not json")
    assert _generate(specs, out) == 0
    cache.unlink()
    assert _generate(specs, out, check=True) == 0
    assert _snapshot(out) == first


def test_rendering_in_several_processes_gives_the_same_files_and_log(tmp_path):
    """generate --jobs N: the modules that need rendering go to N processes; the files, their
    order and the log's order are those of one process."""
    specs = tmp_path / "specs"
    for family, name in (("regression", "mse"), ("classification", "binary_cross_entropy_logits"),
                         ("robust", "huber")):
        (specs / family).mkdir(parents=True, exist_ok=True)
        (specs / family / f"{name}.toml").write_text((SPECS_DIR / family / f"{name}.toml").read_text())
    (specs / "robust" / "square.toml").write_text(
        'name = "square"\n[inputs]\np = { role = "prediction" }\n[loss]\nexpr = "p**2"\n')
    logs = {1: [], 2: []}
    results = {jobs: generation.render_all(specs, log=logs[jobs].append, jobs=jobs) for jobs in (1, 2)}
    assert list(results[1][0]) == list(results[2][0])  # the specialised module next to its loss
    assert results[1] == results[2]
    assert "_binary_cross_entropy_logits_defaults.py" in results[2][0]
    assert [line.split()[1] for line in logs[1]] == [line.split()[1] for line in logs[2]]
    assert not results[2][1]


# --- emit: common subexpressions computed in the branch that needs them --------------------


def _branch_local_examples():
    x, y = sp.symbols("x y", real=True)
    a = sp.Piecewise((sp.exp(x) * y + sp.exp(x), x > 1), (sp.log(y**2 + 1) * x + sp.log(y**2 + 1), True))
    b = sp.Piecewise((sp.exp(x) - y, x > 1), (sp.log(y**2 + 1) - x, True))
    inner = sp.Piecewise((sp.exp(x) + sp.sin(y), x > 1), (sp.cos(y) + 1, True))
    c = sp.Piecewise((sp.sqrt(y**2 + 1) * inner + sp.sqrt(y**2 + 1), y > 0), (x + inner**2, True))
    # a branch's temporary reading a Piecewise of its own statement, which is also a temporary
    q = sp.log(y**2 + 1) * sp.Piecewise((2 * inner, y > 0), (y, True))
    d = sp.Piecewise((sp.exp(x) * y, x > 1), (q**2 + q, True))
    return (x, y), [[a, b, c, sp.tanh(x) * inner], [d, sp.tanh(x) * inner]]


@pytest.mark.parametrize("case", [0, 1])
def test_branch_local_code_computes_what_the_expressions_say(case):
    """scoped_code moves what one Piecewise branch needs into that branch (and Piecewises with
    the same conditions into one if-statement, nested ones too): each statement must still come
    after what it reads, and the values must be those of the expressions."""
    symbols, examples = _branch_local_examples()
    exprs = examples[case]
    lines, printed = scoped_code(exprs, NumbaPrinter(), "_t", "_b")
    assert any(line.startswith("if ") for line in lines)
    source = "def f(x, y):\n" + "".join(f"    {line}\n" for line in lines) + f"    return {', '.join(printed)}\n"
    namespace = {"math": math}
    exec(source, namespace)  # a statement before what it reads fails here (UnboundLocalError)
    expected = sp.lambdify(symbols, exprs, "math")
    for point in [(2.0, 0.5), (-1.0, 2.0), (1.5, -1.0), (0.3, 0.1), (1.0, -2.0)]:
        assert namespace["f"](*point) == pytest.approx(expected(*point), rel=1e-14), source


def test_an_even_function_of_u_and_of_minus_u_is_computed_once():
    """y*logcosh(-x/2) + (1 - y)*logcosh(x/2) (the middle branch of a softplus split): the
    emitter writes both as logcosh(x/2), and the kernel calls it once, with the same values
    (the helper starts from |x|, so the two are equal bit for bit). Binary cross-entropy on
    logits, whose loss took that branch until its big parts were found to keep one sign there
    (stabilise._one_sign), keeps its digits near 0 either way."""
    x, y = sp.symbols("x y", real=True)
    expr = y * logcosh(-x / 2) + (1 - y) * logcosh(x / 2)
    lines, returned = kernel_code([expr], NumbaPrinter())
    source = "\n".join(lines + [returned])
    assert source.count("_logcosh_from(") == 1, source
    bce = lossgen.get("binary_cross_entropy_logits")
    logits = np.array([-1.0, -0.3, 0.0, 1e-300, 0.7, 1.0])
    for label in (0.0, 0.25, 1.0):
        with mpmath.workdps(30):
            truth = [float(mpmath.log1p(mpmath.exp(mpmath.mpf(v))) - label * mpmath.mpf(v)) for v in logits]
        np.testing.assert_allclose(bce.loss(np.full(6, label), logits, reduction="none"), truth, rtol=1e-15)

def test_sigmoids_and_softpluses_of_x_and_minus_x_share_one_exp_and_one_log1p():
    """sigmoid(x), sigmoid(-x), softplus(x), softplus(-x) (binary cross-entropy on logits, its
    gradient and loss): one exp(-|x|) for all four, one log1p of it for the softpluses, printed
    once each; the helpers compute what the whole-function helpers did, bit for bit."""
    x, y = sp.symbols("x y", real=True)
    exprs = [y * softplus(-x) + (1 - y) * softplus(x), (1 - y) * sigmoid(x) - y * sigmoid(-x),
             sigmoid(x) * sigmoid(-x)]
    lines, returned = kernel_code(exprs, NumbaPrinter())
    source = "\n".join(lines + [returned])
    assert source.count("math.exp(") == 1 and source.count("math.log1p(") == 1, source
    bce = lossgen.get("binary_cross_entropy_logits")
    logits = np.array([-800.0, -40.0, -3.0, -1e-300, 0.0, 2.5, 37.0, 800.0])
    with mpmath.workdps(40):
        truth = [float(mpmath.log1p(mpmath.exp(-abs(mpmath.mpf(v)))) + max(float(v), 0.0)) for v in logits]
    np.testing.assert_allclose(bce.loss(np.zeros(8), logits, reduction="none"), truth, rtol=1e-15)


def test_tanh_and_logcosh_share_one_expm1_and_keep_their_digits():
    """tanh(u) and logcosh(u) are written from one expm1(|u|) (libm's tanh and sinh each cost
    more than expm1): the log_cosh loss's kernels call expm1 once per element, and the values
    stay within a few units in the last place of the truth, over the whole range."""
    x = sp.Symbol("x", real=True)
    lines, returned = kernel_code([logcosh(x), sp.tanh(x), logcosh(-x) * sp.tanh(-x)], NumbaPrinter())
    source = "\n".join(lines + [returned])
    assert source.count("math.expm1(") == 1 and "math.tanh(" not in source and "sinh(" not in source, source
    log_cosh = lossgen.get("log_cosh")
    r = np.concatenate([[0.0, -0.0, 1e-300, -1e-200, 1e-8, 19.9, 20.0, 20.1, -25.0, 700.0, -800.0],
                        np.random.default_rng(3).normal(scale=3.0, size=200)])
    loss, grad, _ = log_cosh.loss_grad_hess(np.zeros_like(r), r)
    with mpmath.workdps(50):
        loss_truth = [float(mpmath.log(mpmath.cosh(mpmath.mpf(v)))) for v in r]
        grad_truth = [float(mpmath.tanh(mpmath.mpf(v))) for v in r]
    np.testing.assert_allclose(loss, loss_truth, rtol=1e-15, atol=0)
    np.testing.assert_allclose(grad, grad_truth, rtol=1e-15, atol=0)
    assert math.copysign(1.0, grad[1]) == -1.0  # tanh(-0) = -0


def test_exp_in_the_branch_that_computes_expm1_is_expm1_plus_1():
    """Poisson's gradient and Hessian: 1 - y + expm1(p) for |p| <= 1, else exp(p) - y; and
    exp(p). In the branch, exp(p) is written expm1(p) + 1, so an element calls one function, not
    two, and the Hessian stays within 2 units in the last place of exp(p)."""
    y, p = sp.symbols("y p", real=True)
    from sympy.codegen.cfunctions import expm1
    grad = sp.Piecewise((1 - y + expm1(p), sp.Abs(p) <= 1), (sp.exp(p) - y, True))
    lines, returned = kernel_code([grad, sp.exp(p)], NumbaPrinter())
    source = "\n".join(lines + [returned])
    assert source.count("math.expm1(") == 1 and source.count("math.exp(") == 1, source
    assert source.index("math.exp(") > source.index("else:"), source  # exp only where |p| > 1
    poisson = lossgen.get("poisson")
    points = np.concatenate([np.linspace(-1.0, 1.0, 2001), [1e-300, -1e-18, 1.5, -30.0, 700.0]])
    _, hess = poisson.grad_hess(np.ones_like(points), points)
    with mpmath.workdps(40):
        truth = np.array([float(mpmath.exp(mpmath.mpf(v))) for v in points])
    assert np.max(np.abs(hess - truth) / truth) <= 2 * 2.0 ** -52


def test_fma_is_the_exactly_rounded_fused_multiply_add():
    """The _fma helper (fused multiply-add, one rounding) against exact rational arithmetic."""
    from fractions import Fraction
    module = lossgen.get("poisson").module
    rng = np.random.default_rng(11)
    a, b = rng.normal(size=(2, 300))
    c = np.concatenate([rng.normal(size=150), 1.0 - (a * b)[150:]])
    for u, v, w in zip(a, b, c):
        assert module._fma(u, v, w) == float(Fraction(u) * Fraction(v) + Fraction(w))
    assert module._fma(1e-300, 1e300, -1.0) == float(Fraction(1e-300) * Fraction(1e300) - 1)


# --- runtime: serial or parallel, thread limits ---------------------------------------------


class _SpyKernel:
    """Stands in for one of a generated kernel's launchers: records which one ran and on how
    many threads (in ``calls``, shared by the pair), writes zeros."""

    def __init__(self, outputs, parallel, calls):
        self.outputs, self.parallel, self.calls = outputs, parallel, calls

    def __call__(self, *arguments):
        self.calls.append({"parallel": self.parallel, "threads": numba.get_num_threads()})
        for out in arguments[len(arguments) - self.outputs:]:
            out[:] = 0.0
        return 0.0


def _spy_launchers(**outputs) -> dict:
    """NAME_kernel and NAME_kernel_parallel spies for each NAME=number of outputs."""
    spies = {}
    for name, count in outputs.items():
        calls = []
        spies[f"{name}_kernel"] = _SpyKernel(count, False, calls)
        spies[f"{name}_kernel_parallel"] = _SpyKernel(count, True, calls)
    return spies


def _spy_loss(costs=None):
    module = types.SimpleNamespace(
        __doc__="spy",
        SPEC={"name": "spy", "title": "Spy", "family": "test", "summary": "",
              "inputs": (("y", "target", "real"), ("p", "prediction", "real")),
              "params": (("delta", 1.0, "positive"),), "kernels": {"grad_hess": 2, "loss": 1},
              **({} if costs is None else {"costs": costs})},
        **_spy_launchers(grad_hess=2, loss_sum=0))
    return runtime.Loss(module), module


def test_small_arrays_run_serially_large_ones_in_parallel(monkeypatch):
    monkeypatch.delenv(runtime.THREADS_VARIABLE, raising=False)
    loss, module = _spy_loss()
    small, large = np.zeros(runtime.SERIAL_BELOW["libm"] - 1), np.zeros(runtime.SERIAL_BELOW["libm"])
    loss.grad_hess(small, small)
    loss.loss(small, small)
    loss.grad_hess(large, large)
    loss.loss(large, large)
    parallel_expected = numba.get_num_threads() > 1
    assert [c["parallel"] for c in module.grad_hess_kernel.calls] == [False, parallel_expected]
    assert [c["parallel"] for c in module.loss_sum_kernel.calls] == [False, parallel_expected]


def test_each_kernel_takes_the_threshold_of_its_cost(monkeypatch):
    """An arithmetic kernel (bound by memory) stays serial on arrays where one that calls libm
    runs in parallel: each takes SERIAL_BELOW of the cost that its module's SPEC marks."""
    monkeypatch.delenv(runtime.THREADS_VARIABLE, raising=False)
    loss, module = _spy_loss(costs={"grad_hess": "arithmetic", "loss_sum": "libm"})
    between, large = np.zeros(runtime.SERIAL_BELOW["libm"]), np.zeros(runtime.SERIAL_BELOW["arithmetic"])
    assert between.size < large.size
    loss.grad_hess(between, between)
    loss.loss(between, between)
    loss.grad_hess(large, large)
    parallel_expected = numba.get_num_threads() > 1
    assert [c["parallel"] for c in module.grad_hess_kernel.calls] == [False, parallel_expected]
    assert [c["parallel"] for c in module.loss_sum_kernel.calls] == [parallel_expected]


@pytest.mark.parametrize("expr, cost", [
    (X**2 - 2 * X + sp.Abs(X) / (1 + X**2), "arithmetic"),
    (sp.Piecewise((X**2 / 2, sp.Abs(X) <= 1), (sp.Abs(X) - sp.Rational(1, 2), True)) * sp.sign(X), "arithmetic"),
    (sp.exp(X) - X, "vector"), (sp.exp(X) - sp.log(X), "libm"), (sp.sqrt(1 + X**2), "libm"),
    (X**sp.Float(1.5), "libm"), (sp.Piecewise((sp.log(X), X > 1), (0, True)), "libm"),
])
def test_kernel_cost_is_arithmetic_without_libm_calls(expr, cost):
    """Arithmetic alone; an exponential whose loop vectorises (the VECTOR_FUNCTIONS' helpers);
    any other function call."""
    exprs = [X, expr]
    assert kernel_cost(exprs, kernel_vectorises([code_form(e) for e in exprs])) == cost


@pytest.mark.parametrize("name, cost", [("mse", "arithmetic"), ("mae", "arithmetic"), ("huber", "arithmetic"),
                                        ("poisson", "vector"), ("binary_cross_entropy_logits", "vector"),
                                        ("pseudo_huber", "libm")])
def test_catalog_kernels_are_marked_by_their_cost(name, cost):
    assert set(lossgen.get(name).module.SPEC["costs"].values()) == {cost}


def test_numba_set_num_threads_1_gives_the_serial_loop(monkeypatch):
    monkeypatch.delenv(runtime.THREADS_VARIABLE, raising=False)
    loss, module = _spy_loss()
    large = np.zeros(runtime.SERIAL_BELOW["libm"])
    previous = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        loss.grad_hess(large, large)
    finally:
        numba.set_num_threads(previous)
    assert module.grad_hess_kernel.calls == [{"parallel": False, "threads": 1}]


def test_environment_variable_1_gives_the_serial_loop(monkeypatch):
    monkeypatch.setenv(runtime.THREADS_VARIABLE, "1")
    loss, module = _spy_loss()
    large = np.zeros(runtime.SERIAL_BELOW["libm"])
    before = numba.get_num_threads()
    loss.grad_hess(large, large)
    assert module.grad_hess_kernel.calls[0]["parallel"] is False
    assert numba.get_num_threads() == before


@pytest.mark.parametrize("value", ["0", "-2", "two"])
def test_environment_variable_must_be_a_positive_integer(monkeypatch, value):
    monkeypatch.setenv(runtime.THREADS_VARIABLE, value)
    loss, _ = _spy_loss()
    large = np.zeros(runtime.SERIAL_BELOW["libm"])
    with pytest.raises(ValueError, match=runtime.THREADS_VARIABLE):
        loss.grad_hess(large, large)


LIMIT_PROBE = """
import json, numba, numpy as np, sys
sys.path.insert(0, sys.argv[1])
from test_performance_plumbing import _spy_loss
from lossgen import runtime
loss, module = _spy_loss()
large = np.zeros(runtime.SERIAL_BELOW["libm"])
loss.grad_hess(large, large)
print(json.dumps({"call": module.grad_hess_kernel.calls[0], "after": numba.get_num_threads()}))
"""


def test_environment_variable_caps_numba_threads_during_the_call(tmp_path):
    env = dict(os.environ, NUMBA_NUM_THREADS="3", LOSSGEN_NUM_THREADS="2")
    result = subprocess.run([sys.executable, "-c", LIMIT_PROBE, os.path.dirname(__file__)],
                            capture_output=True, text=True, env=env, check=True)
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    assert seen == {"call": {"parallel": True, "threads": 2}, "after": 3}


def test_serial_and_parallel_loops_give_identical_results(monkeypatch):
    monkeypatch.delenv(runtime.THREADS_VARIABLE, raising=False)
    huber = lossgen.get("huber")
    rng = np.random.default_rng(6)
    y, p = rng.normal(size=(2, 3000))
    weight = rng.uniform(size=3000)
    results = {}
    for serial_below in (10**9, 0):  # every call serial, then every call parallel
        monkeypatch.setattr(runtime, "SERIAL_BELOW", dict.fromkeys(runtime.SERIAL_BELOW, serial_below))
        results[serial_below] = (huber.grad_hess(y, p, delta=0.7),
                                 huber.grad_hess(y, p, sample_weight=weight),
                                 huber.loss(y, p, reduction="sum"))
    (serial_gh, serial_wgh, serial_sum), (parallel_gh, parallel_wgh, parallel_sum) = results.values()
    for serial, parallel in zip(serial_gh + serial_wgh, parallel_gh + parallel_wgh):
        np.testing.assert_array_equal(serial, parallel)
    assert parallel_sum == pytest.approx(serial_sum, rel=1e-13)  # only the order of the sum differs


# --- row-wise kernels: the same serial path and thread limits --------------------------------


def _spy_row_loss():
    module = types.SimpleNamespace(
        __doc__="spy",
        SPEC={"name": "rowspy", "title": "Row spy", "family": "test", "summary": "", "rowwise": True,
              "axis": "class",
              "inputs": (("y", "target", "real", "class", False, None), ("s", "prediction", "real", "class", False, None)),
              "params": (), "kernels": {"grad_hess": 2, "loss": 1, "hvp": 1}},
        **_spy_launchers(grad_hess=2, loss=1, hvp=1))
    return RowLoss(module), module


def test_row_kernels_run_serially_below_the_threshold_in_parallel_above(monkeypatch):
    monkeypatch.delenv(runtime.THREADS_VARIABLE, raising=False)
    loss, module = _spy_row_loss()
    columns = 10
    small = np.zeros(((runtime.SERIAL_BELOW["row"] - 1) // columns, columns))  # N * C elements decide
    large = np.zeros((runtime.SERIAL_BELOW["row"] // columns, columns))
    loss.grad_hess(small, small)
    loss.loss(small, small)
    loss.grad_hess(large, large)
    loss.loss(large, large)
    parallel_expected = numba.get_num_threads() > 1
    assert [c["parallel"] for c in module.grad_hess_kernel.calls] == [False, parallel_expected]
    assert [c["parallel"] for c in module.loss_kernel.calls] == [False, parallel_expected]
    # a Hessian-vector product does C times the work per row: the same rows go parallel
    rows = np.zeros((runtime.SERIAL_BELOW["row"] // columns**2, columns))
    loss.hvp(rows, rows, v=rows)
    assert [c["parallel"] for c in module.hvp_kernel.calls] == [parallel_expected]
    # unless the generator marks it linear (its blocks summed in O(C M): SPEC["quadratic"])
    module.SPEC["quadratic"] = ("hess_full",)
    loss.hvp(rows, rows, v=rows)
    assert [c["parallel"] for c in module.hvp_kernel.calls] == [parallel_expected, False]


def test_row_kernels_follow_set_num_threads_and_the_environment_variable(monkeypatch):
    monkeypatch.delenv(runtime.THREADS_VARIABLE, raising=False)
    loss, module = _spy_row_loss()
    large = np.zeros((runtime.SERIAL_BELOW["row"], 2))
    previous = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        loss.grad_hess(large, large)
    finally:
        numba.set_num_threads(previous)
    monkeypatch.setenv(runtime.THREADS_VARIABLE, "1")
    loss.grad_hess(large, large)
    assert module.grad_hess_kernel.calls == [{"parallel": False, "threads": 1},
                                             {"parallel": False, "threads": previous}]
    assert numba.get_num_threads() == previous
    monkeypatch.setenv(runtime.THREADS_VARIABLE, "0")
    with pytest.raises(ValueError, match=runtime.THREADS_VARIABLE):
        loss.grad_hess(large, large)


def test_row_kernels_serial_and_parallel_loops_give_identical_results(monkeypatch):
    monkeypatch.delenv(runtime.THREADS_VARIABLE, raising=False)
    sce = lossgen.get("softmax_cross_entropy")
    rng = np.random.default_rng(7)
    y, s = rng.integers(0, 5, size=400), rng.normal(scale=3.0, size=(400, 5))
    weight, v = rng.uniform(size=400), rng.normal(size=(400, 5))
    results = {}
    for serial_below in (10**9, 0):  # every call serial, then every call parallel
        monkeypatch.setattr(runtime, "SERIAL_BELOW", dict.fromkeys(runtime.SERIAL_BELOW, serial_below))
        results[serial_below] = (*sce.loss_grad_hess(y, s, label_smoothing=0.1, sample_weight=weight),
                                 sce.hvp(y, s, v=v))
    for serial, parallel in zip(*results.values()):
        np.testing.assert_array_equal(serial, parallel)


def test_softmax_weights_come_from_the_logsumexp_pass():
    """Softmax cross-entropy's fused row kernel: one exp per element (in the logsumexp pass, kept
    in the scratch row; _vexp, in a loop of its own that vectorises), p_k = E_k/(1 + S),
    1 - p_k = S/(1 + S) at the arg-max (no expm1: every other p_k is at most 1/2); and over many
    blocks of 256 rows, serial and parallel, every output within 1e-14 of mpmath's."""
    import inspect
    module = lossgen.get("softmax_cross_entropy").specialised  # no label smoothing, no class weights
    source = inspect.getsource(module._loss_grad_hess_row.py_func)
    assert source.count("_vexp(") == 1 and "math.exp" not in source and "expm1(" not in source, source
    assert "_stash[0, _k] = _vexp(_s - _m0)" in source, source
    assert "_stash[0, _k] * _l0_inv" in source and "_l0_rest = _l0 * _l0_inv" in source, source
    assert "((-_l0_rest) if ((1.0 if _k == _a0 else 0.0) == 1.0) else (_p0 - 1.0))" in source, source
    rng = np.random.default_rng(3)
    y, s = rng.integers(0, 5, size=1000), rng.normal(scale=4.0, size=(1000, 5))
    s[::7, 2] = 40.0  # rows that one class holds: 1 - p cancels there, unless taken as S/(1 + S)
    with mpmath.workdps(40):
        p = [[mpmath.exp(v) / mpmath.fsum(mpmath.exp(w) for w in row) for v in row] for row in s.tolist()]
        grad = np.array([[float(q - (k == t)) for k, q in enumerate(row)] for row, t in zip(p, y)])
        hess = np.array([[float(q * (1 - q)) for q in row] for row in p])
    for serial_below in (10**9, 0):
        runtime_serial_below, runtime.SERIAL_BELOW = runtime.SERIAL_BELOW, dict.fromkeys(runtime.SERIAL_BELOW, serial_below)
        try:
            _, g, h = lossgen.get("softmax_cross_entropy").loss_grad_hess(y, s)
        finally:
            runtime.SERIAL_BELOW = runtime_serial_below
        assert np.max(np.abs(g - grad) / np.abs(grad)) <= 1e-14  # 3.8e-15 (exp((s - M) - L): 6.4e-15); h 3.9e-15
        assert np.max(np.abs(h - hess) / np.abs(hess)) <= 1e-14


# --- runtime: the fast argument path -------------------------------------------------------

def test_fast_path_gives_the_full_paths_call():
    huber = lossgen.get("huber")
    y, p = np.linspace(-2, 2, 12).reshape(3, 4), np.zeros((3, 4))
    fast = huber._prepare_fast("grad", (y, p), {"delta": 2})
    assert fast is not None
    full = huber._prepare("grad", (), {"y": y, "p": p, "delta": 2}, None)
    assert fast.shape == full.shape and fast.dtype == full.dtype and fast.params == full.params
    for a, b in zip(fast.arrays, full.arrays):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("arrays", [
    lambda y: (y, y[::-1][::2].copy()[:3]),               # shapes differ
    lambda y: (y, y.astype(np.float32)),                  # mixed dtypes: full path
    lambda y: (y[::2], y[1::2]),                          # not contiguous: full path
    lambda y: (list(y), y),                               # not an ndarray: full path
])
def test_fast_path_declines_what_the_full_path_must_handle(arrays):
    huber = lossgen.get("huber")
    assert huber._prepare_fast("grad", arrays(np.arange(8.0)), {}) is None


def test_fast_path_still_validates_parameters():
    huber = lossgen.get("huber")
    y = np.zeros(4)
    with pytest.raises(ValueError, match="parameter 'delta' must be positive"):
        huber._prepare_fast("grad", (y, y), {"delta": -1.0})
    with pytest.raises(TypeError, match="parameter 'delta' must be a real number"):
        huber._prepare_fast("grad", (y, y), {"delta": "1"})
    assert huber._prepare_fast("grad", (y, y), {"dleta": 1.0}) is None  # the full path names it


# --- runtime: kernels specialised at defaults (spec key `specialise`) ------------------------


class _Recorder:
    """Stands in for a launcher of a general or a specialised module: records which module's
    kernel ran and with how many arguments, writes zeros."""

    def __init__(self, which, outputs, calls):
        self.which, self.outputs, self.calls = which, outputs, calls

    def __call__(self, *arguments):
        self.calls.append((self.which, len(arguments)))
        for out in arguments[len(arguments) - self.outputs:]:
            out[:] = 0.0
        return 0.0


def _record_modules(monkeypatch, loss, kernels) -> list:
    """Replace the launchers of ``kernels`` (name -> outputs) of the loss's general and
    specialised modules by recorders; the calls, as (module, number of arguments), in order."""
    calls = []
    for which, module in (("general", loss.module), ("specialised", loss.specialised)):
        for kernel, outputs in kernels.items():
            for suffix in ("", "_parallel"):
                monkeypatch.setattr(module, f"{kernel}_kernel{suffix}", _Recorder(which, outputs, calls))
    return calls


def test_elementwise_loss_runs_the_specialised_kernels_exactly_at_the_defaults(monkeypatch):
    bce = runtime.Loss(lossgen.get("binary_cross_entropy_logits").module)  # no launchers looked up yet
    calls = _record_modules(monkeypatch, bce, {"loss_grad_hess": 3, "grad_hess": 2, "loss_sum": 0})
    y, x = np.array([0.0, 1.0, 0.5]), np.array([-2.0, 0.0, 3.0])
    bce.loss_grad_hess(y, x)
    bce.loss_grad_hess(y, x, pos_weight=1.0)
    bce.grad_hess(y, x, pos_weight=1)
    bce.loss(y, x, sample_weight=np.ones(3))                  # the full argument path
    bce.loss(list(y), x.astype(np.float32))
    at_defaults = calls[:]
    calls.clear()
    bce.loss_grad_hess(y, x, pos_weight=2.0)
    bce.grad_hess(y, x, pos_weight=np.nextafter(1.0, 2.0))
    bce.loss(y, x, pos_weight=0.5, sample_weight=np.ones(3))
    # y, x, (pos_weight,) _weight and the outputs
    assert at_defaults == [("specialised", 6), ("specialised", 6), ("specialised", 5), ("specialised", 3),
                           ("specialised", 3)]
    assert calls == [("general", 7), ("general", 6), ("general", 4)]


def test_row_loss_runs_the_specialised_kernels_exactly_at_the_defaults_without_the_shared_input(monkeypatch):
    sce = RowLoss(lossgen.get("softmax_cross_entropy").module)
    calls = _record_modules(monkeypatch, sce, {"loss_grad_hess": 3, "loss": 1, "hvp": 1, "hess_full": 1})
    y, s = np.array([0, 2]), np.array([[2.0, 0.5, -1.0], [0.0, 0.0, 3.0]])
    sce.loss_grad_hess(y, s)
    sce.loss(y, s, label_smoothing=0.0, sample_weight=np.ones(2))
    sce.hvp(y, s, v=np.ones_like(s))
    sce.hess(y, s, full=True, label_smoothing=0)
    at_defaults = calls[:]
    calls.clear()
    sce.loss_grad_hess(y, s, w=np.ones(3))                   # w given, even all ones
    sce.loss_grad_hess(y, s, label_smoothing=0.1)
    sce.loss(y, s, w=np.full(3, 2.0), label_smoothing=0.1)
    sce.hvp(y, s, v=np.ones_like(s), label_smoothing=1e-300)
    # y, s, (w, label_smoothing,) (v,) _weight and the outputs
    assert at_defaults == [("specialised", 6), ("specialised", 4), ("specialised", 5), ("specialised", 4)]
    assert calls == [("general", 8), ("general", 8), ("general", 6), ("general", 7)]


def test_specialised_and_general_kernels_agree():
    """The two kernels compute one loss: at the defaults the general kernels (reached through
    the module) give the specialised kernels' values to rounding."""
    rng = np.random.default_rng(8)
    sce = lossgen.get("softmax_cross_entropy")
    y, s = rng.integers(0, 4, 50), rng.normal(scale=3.0, size=(50, 4))
    general = [np.empty(50), np.empty((50, 4)), np.empty((50, 4))]
    sce.module.loss_grad_hess_kernel(y, s, np.ones(4), 0.0, None, *general)
    for a, b in zip(sce.loss_grad_hess(y, s), general):
        np.testing.assert_allclose(a, b, rtol=1e-14, atol=1e-300)
    bce = lossgen.get("binary_cross_entropy_logits")
    t, x = rng.uniform(size=50), rng.normal(scale=5.0, size=50)
    general = [np.empty(50) for _ in range(3)]
    bce.module.loss_grad_hess_kernel(t, x, 1.0, None, *general)
    for a, b in zip(bce.loss_grad_hess(t, x), general):
        np.testing.assert_allclose(a, b, rtol=1e-14, atol=1e-300)
    focal = lossgen.get("focal_binary")  # gamma = 2 put in: no power, two products
    general = [np.empty(50) for _ in range(3)]
    focal.module.loss_grad_hess_kernel(t, x, 2.0, 0.25, None, *general)
    for a, b in zip(focal.loss_grad_hess(t, x), general):
        np.testing.assert_allclose(a, b, rtol=1e-13, atol=1e-300)
