"""The vectorising exponentials of templates/numba_helpers.py.j2 (_vexp, _vexpm1) and their
logarithm (_vlog1p) against mpmath: an independent truth at 50 digits, on the edges of their range
(overflow, subnormal results, underflow to 0, signed zeros, inf, nan, tiny arguments, -1 and
below) and on random points, in a loop (the vectorised code) and called alone."""
import importlib.util
import math
import re

import mpmath
import numba
import numpy as np
import pytest

from lossgen.emit import template_environment

EXP_ULPS = 0.76     # measured 0.75 (a subnormal result), 0.51 on normal ones; libm's 0.5
EXPM1_ULPS = 0.84   # measured 0.83; libm's 0.75
LOG1P_ULPS = 0.8    # measured 0.76; glibc's 0.76

EDGES = [
    0.0, -0.0, math.inf, -math.inf, math.nan,
    709.782712893384, 709.7827128933841, 709.78, 709.0, 710.0, 745.0, 750.0, 800.0, 1e300,
    -745.0, -745.1332191019411, -745.1332191019412, -745.2, -746.0, -750.0, -1e300,
    -708.3964185322641, -708.4, -709.0, -720.0, -740.0, -744.44, -37.0, -37.5, -40.0,
    5e-324, -5e-324, 1e-300, -1e-300, 2.0 ** -60, -(2.0 ** -60), 1e-17, -1e-17, 1e-9, -1e-9,
    math.log(2) / 2, -math.log(2) / 2, 0.34657359027997264, 0.3465735902799727, 1.0, -1.0,
    36.7, 37.0, 37.4, 37.5, 38.0, 40.0, 41.0,
]

LOG1P_EDGES = [
    0.0, -0.0, math.inf, -math.inf, math.nan, -1.0, -1.0000000000000002, -1.5, -2.0, -1e300,
    -0.9999999999999999, -1 + 2.0 ** -30, -0.5, -0.2928932188134524, -0.29289321881345254, -0.2928932188134525,
    0.41421356237309503, 0.4142135623730951, 0.414213562373095, 1.0, 2.0, 3.0, 2.0 ** 52, 2.0 ** 53,
    2.0 ** 53 + 2.0, 2.0 ** 54, 1e300, 1.7976931348623157e308,
    5e-324, -5e-324, 2.2250738585072014e-308, -2.2250738585072014e-308, 1e-310, -1e-310, 1e-300, -1e-300,
    2.0 ** -53, -(2.0 ** -53), 2.0 ** -54, 1e-17, -1e-17, 1e-9, -1e-9, math.exp(-1.0), math.exp(-30.0),
    math.exp(-745.0), math.e - 1,
]


@pytest.fixture(scope="module")
def helpers(tmp_path_factory):
    """The template's blocks, rendered into a module of their own (as a generated module has them)."""
    source = "import math\n\nimport numba\n\n\n" + template_environment().get_template(
        "numba_helpers.py.j2").render(helpers={"vexp", "vexpm1", "exp_core", "select", "vlog1p"})
    path = tmp_path_factory.mktemp("vector_exp") / "vector_exp_helpers.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("vector_exp_helpers", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def loops(helpers):
    vexp, vexpm1, vlog1p = helpers._vexp, helpers._vexpm1, helpers._vlog1p

    @numba.njit(error_model="numpy")
    def exp_loop(x, out):
        for i in range(x.shape[0]):
            out[i] = vexp(x[i])

    @numba.njit(error_model="numpy")
    def expm1_loop(x, out):
        for i in range(x.shape[0]):
            out[i] = vexpm1(x[i])

    @numba.njit(error_model="numpy")
    def log1p_loop(x, out):
        for i in range(x.shape[0]):
            out[i] = vlog1p(x[i])

    return {"exp": exp_loop, "expm1": expm1_loop, "log1p": log1p_loop}


def ulps(value: float, truth) -> float:
    """|value - truth| in units in the last place of truth (2**-1074 below the normal range)."""
    exponent = int(mpmath.floor(mpmath.log(abs(truth), 2)))
    return float(abs(mpmath.mpf(value) - truth) / mpmath.ldexp(1, max(exponent - 52, -1074)))


def check(name, x, y, limit):
    truth_function = {"exp": mpmath.exp, "expm1": mpmath.expm1, "log1p": mpmath.log1p}[name]
    worst = 0.0
    with mpmath.workdps(50):
        for xi, yi in zip(x.tolist(), y.tolist()):
            if math.isnan(xi) or (name == "log1p" and xi < -1):
                assert math.isnan(yi), (name, xi, yi)
                continue
            if name == "log1p" and xi == -1:
                assert yi == -math.inf, (name, xi, yi)
                continue
            truth = truth_function(mpmath.mpf(xi))
            nearest = float(truth)  # the correctly rounded value; inf beyond the largest float
            if math.isinf(nearest) or nearest == 0.0 or math.isinf(xi):
                assert yi == nearest, (name, xi, yi, nearest)
            else:
                error = ulps(yi, truth)
                assert error <= limit, (name, xi, yi, nearest, error)
                worst = max(worst, error)
            if nearest == 0.0 or xi == 0.0:  # the sign of a zero: expm1(-0) = -0, exp(-1000) = +0
                assert math.copysign(1.0, yi) == math.copysign(1.0, nearest if xi != 0.0 or name == "exp" else xi)
    return worst


@pytest.mark.parametrize("name, limit", [("exp", EXP_ULPS), ("expm1", EXPM1_ULPS), ("log1p", LOG1P_ULPS)])
def test_on_the_edges_of_the_range(helpers, name, limit):
    x = np.array(LOG1P_EDGES if name == "log1p" else EDGES)
    y = np.empty_like(x)
    loops(helpers)[name](x, y)
    check(name, x, y, limit)
    function = getattr(helpers, f"_v{name}")
    alone = numba.njit(lambda v: function(v))
    for xi, yi in zip(x.tolist(), y.tolist()):  # the same values called alone, outside a loop
        assert alone(xi) == yi or (math.isnan(yi) and math.isnan(alone(xi)))


@pytest.mark.parametrize("name, limit", [("exp", EXP_ULPS), ("expm1", EXPM1_ULPS)])
def test_on_random_points(helpers, name, limit):
    rng = np.random.default_rng(6)
    x = np.concatenate([
        rng.uniform(-745.2, 709.8, 1500),                                   # the whole range
        rng.uniform(-2.0, 2.0, 800),                                        # k = -3 .. 3
        rng.choice([-1.0, 1.0], 400) * 10.0 ** rng.uniform(-320, -1, 400),  # tiny, down to subnormal
        rng.uniform(-745.2, -708.3, 400),                                   # subnormal results
        rng.uniform(709.0, 709.79, 200),                                    # near overflow
        rng.uniform(-40.0, 40.0, 400),
    ])
    y = np.empty_like(x)
    loops(helpers)[name](x, y)
    assert check(name, x, y, limit) > 0.4  # the measure itself sees rounding errors


def test_log1p_on_random_points(helpers):
    rng = np.random.default_rng(7)
    x = np.concatenate([
        10.0 ** rng.uniform(-300, 300, 800),                                # the whole range, x > 0
        -(10.0 ** rng.uniform(-300, 0, 400)),                               # (-1, 0)
        rng.choice([-1.0, 1.0], 400) * 10.0 ** rng.uniform(-320, -1, 400),  # tiny, down to subnormal
        -1.0 + 10.0 ** rng.uniform(-16, 0, 400),                            # near -1
        np.exp(-rng.uniform(0.0, 40.0, 800)),                               # softplus: log1p(exp(-|x|))
        rng.uniform(-0.35, 0.45, 400),                                      # around k = 0's interval
    ])
    y = np.empty_like(x)
    loops(helpers)["log1p"](x, y)
    assert check("log1p", x, y, LOG1P_ULPS) > 0.4


def test_the_loops_vectorise(helpers):
    """Packed fused multiply-adds (_vlog1p: multiplications and divisions) where the CPU has them
    (AVX2 or AVX-512): a call per element would not be."""
    import llvmlite.binding as llvm
    features = llvm.get_host_cpu_features()
    if not (features.get("avx2") and features.get("fma")):
        pytest.skip("no AVX2 with FMA on this CPU")
    for name, loop in loops(helpers).items():
        x = np.linspace(-3.0, 3.0, 64)
        loop(x, np.empty_like(x))
        asm = loop.inspect_asm(loop.signatures[0])
        assert re.search(r"\bv(fmadd\d{3}|mul|div)pd\s[^\n]*[yz]mm", asm), name  # _vlog1p: no fma


def test_the_emitter_calls_them_only_where_the_loop_vectorises():
    """exp, expm1 and log1p become _vexp, _vexpm1 and _vlog1p in a kernel of arithmetic, exponentials
    and log1p; a kernel that keeps another libm call (log here) keeps libm's exp, the cheaper call in
    a scalar loop."""
    import sympy as sp
    from sympy.codegen.cfunctions import expm1

    from lossgen.emit import NumbaPrinter, code_form, kernel_code, kernel_vectorises
    from lossgen.paths import GENERATED_DIR
    from lossgen.vocabulary import sigmoid, softplus

    x, y = sp.symbols("x y", real=True)
    cases = [([sigmoid(x) - y, sigmoid(x) * sigmoid(-x)], True),
             ([sp.Piecewise((expm1(x) + 1 - y, sp.Abs(x) <= 1), (sp.exp(x) - y, True))], True),
             ([softplus(x) - x * y, sigmoid(x) - y], True),
             ([softplus(x) - sp.log(x + 2) * y], False),
             ([(x - y) ** 2], False)]
    for exprs, vectorises in cases:
        assert kernel_vectorises([code_form(e) for e in exprs]) is vectorises, exprs
        lines, returned = kernel_code(exprs, NumbaPrinter(), vectorises)
        source = "\n".join(lines + [returned])
        assert ("_vexp" in source) is vectorises and ("math.exp" in source) is (not vectorises and "exp" in source), source
    poisson = (GENERATED_DIR / "poisson.py").read_text()
    grad_hess = poisson.split("def grad_hess_scalar(")[1].split("\n@")[0]
    assert "_vexpm1(" in grad_hess and "_select(_inside, " in grad_hess and "math.exp" not in grad_hess
    bce = (GENERATED_DIR / "_binary_cross_entropy_logits_defaults.py").read_text()
    for kernel in ("loss", "loss_grad_hess"):
        source = bce.split(f"def {kernel}_scalar(")[1].split("\n@")[0]
        assert "_vlog1p(" in source and "math.log1p" not in source, kernel
    log_cosh = (GENERATED_DIR / "log_cosh.py").read_text()
    source = log_cosh.split("def loss_scalar(")[1].split("\n@")[0]
    assert "_vlogcosh_from(" in source and "math.log1p" not in source, source


def _row_function(module: str, kernel: str) -> str:
    from lossgen.paths import GENERATED_DIR
    return (GENERATED_DIR / f"{module}.py").read_text().split(f"def _{kernel}_row(")[1].split("\n@")[0]


def test_row_kernels_call_them_where_their_loops_vectorise():
    """Row-wise kernels (lossgen/emit_rows.py, _Body.plan_vector): a log-sum-exp's exp(g_k - M)
    in a loop of its own into a scratch row, summed by the next loop in the same order; an
    element pass, or a sum's terms, of arithmetic and exponentials where every element takes
    one; not where the exponentials lie in seldom-taken branches (softmax cross-entropy's element
    pass with label smoothing), nor where a row value takes the same exponential with libm's
    (poly1's weight at the true class, which its sum of weights takes out again: the same floats)."""
    for module in ("_softmax_cross_entropy_defaults", "info_nce", "softmax_cross_entropy"):
        for kernel in ("loss", "grad_hess", "loss_grad_hess"):
            source = _row_function(module, kernel)
            assert re.search(r"_stash\[0, _k\] = _vexp\(_s - _m\d\)", source) and "math.exp(_s" not in source, (module, kernel)
            assert re.search(r"_s = _stash\[0, _k\]\n        if _k != _a(\d):\n            _l\1 \+= _s", source), (module, kernel)
    general = _row_function("softmax_cross_entropy", "loss_grad_hess")
    assert "math.expm1(" in general and "_vexpm1(" not in general  # its element pass stays scalar
    margin = _row_function("multilabel_soft_margin", "loss_grad_hess")
    assert "_vlog1p(_vexp(-abs(_e_x)))" in margin and "_stash[0, _k] = " in margin and "math.exp" not in margin
    poly1 = _row_function("poly1_cross_entropy", "grad")
    assert "epsilon*math.exp(_r2)" in poly1 and "_vexpm1(" not in poly1, poly1


def test_row_loops_vectorise():
    """Packed fused multiply-adds in softmax cross-entropy's fused row kernel (the row function
    is inlined into its launchers), none before (libm's exp per element)."""
    import llvmlite.binding as llvm
    import lossgen
    features = llvm.get_host_cpu_features()
    if not (features.get("avx2") and features.get("fma")):
        pytest.skip("no AVX2 with FMA on this CPU")
    module = lossgen.get("softmax_cross_entropy").specialised
    kernel = numba.njit(error_model="numpy")(module.loss_grad_hess_kernel.py_func)  # not from the cache: inspectable
    y, s = np.array([0, 1, 2]), np.linspace(-3.0, 3.0, 30).reshape(3, 10)
    outs = np.empty(3), np.empty((3, 10)), np.empty((3, 10))
    kernel(y, s, None, *outs)
    asm = kernel.inspect_asm(kernel.signatures[0])
    assert re.search(r"\bvfmadd\d{3}pd\s[^\n]*[yz]mm", asm)
