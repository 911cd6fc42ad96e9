"""The runtime API (lossgen/runtime.py) against the committed generated/ catalog.

Expected values come from independent NumPy implementations of the textbook formulas written
here, never from the code under test. To keep Numba compilation cheap, the tests reuse a few
losses (huber, mse, elastic_net) and few (kernel, dtype, weighted) combinations: every input
is converted to contiguous float64 or float32 before it reaches a kernel.
"""
from __future__ import annotations

import re
import subprocess
import sys

import numpy as np
import pytest

import lossgen
from lossgen.paths import GENERATED_DIR

CATALOG = ["mse", "mae", "smooth_l1", "huber", "pseudo_huber", "charbonnier", "msle", "log_cosh",
           "cauchy", "cauchy_rho", "quantile", "poisson", "l1_penalty", "l2_penalty", "elastic_net"]

RTOL = 1e-12


# --- independent truths --------------------------------------------------------------------

def huber_np(y, p, delta=1.0):
    """Huber (1964): r^2/2 for |r| <= delta, delta (|r| - delta/2) beyond; r = p - y."""
    r = np.asarray(p, dtype=np.float64) - np.asarray(y, dtype=np.float64)
    a = np.abs(r)
    loss = np.where(a <= delta, 0.5 * r * r, delta * (a - 0.5 * delta))
    grad = np.where(a <= delta, r, delta * np.sign(r))
    hess = np.where(a < delta, 1.0, 0.0)  # 0 on the linear part; the test data avoid |r| = delta
    return loss, grad, hess


def mse_np(y, p):
    r = np.asarray(p, dtype=np.float64) - np.asarray(y, dtype=np.float64)
    return r * r, 2 * r, np.full_like(r, 2.0)


def elastic_net_np(w, lambda1, lambda2):
    w = np.asarray(w, dtype=np.float64)
    return (lambda1 * np.abs(w) + lambda2 * w * w,
            lambda1 * np.sign(w) + 2 * lambda2 * w,  # d|w|/dw = 0 at w = 0, as PyTorch
            np.full_like(w, 2 * lambda2))


def close(actual, expected, rtol=RTOL, atol=1e-15):
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol)


def data(shape, seed=0, scale=2.0):
    """Targets and predictions with residuals on both sides of delta = 1 (never exactly on it)."""
    rng = np.random.default_rng(seed)
    y = rng.normal(size=shape)
    p = y + scale * rng.normal(size=shape)
    return y, p


@pytest.fixture(scope="module")
def huber():
    return lossgen.get("huber")


# --- catalog -------------------------------------------------------------------------------

def test_available_lists_catalog():
    names = lossgen.available()
    assert set(CATALOG) <= set(names)
    assert names == sorted(names)
    modules = {f.stem for f in GENERATED_DIR.glob("*.py") if not f.name.startswith("_")}
    assert set(names) == modules
    # and the kernels specialised at defaults of the losses whose specs mark names `specialise`
    specialised = {f.stem for f in GENERATED_DIR.glob("_*.py") if f.name != "__init__.py"}
    assert specialised == {f"_{name}_defaults" for name in names
                           if '"specialised": (' in (GENERATED_DIR / f"{name}.py").read_text()}


def test_losses_attribute_is_get(huber):
    assert lossgen.losses.huber is huber
    assert lossgen.get("huber") is huber
    assert "huber" in dir(lossgen.losses)
    assert huber.name == "huber" and huber.inputs == ("y", "p") and huber.predictions == ("p",)
    assert set(huber.params) == {"delta"}


def test_unknown_loss_name():
    with pytest.raises(ValueError, match="did you mean 'huber'"):
        lossgen.get("hubber")
    with pytest.raises(ValueError, match="unknown loss 'nope'"):
        lossgen.get("nope")
    with pytest.raises(AttributeError, match="nope"):
        lossgen.losses.nope
    assert not hasattr(lossgen.losses, "nope")


# --- values --------------------------------------------------------------------------------

@pytest.mark.parametrize("delta", [1.0, 0.7])
def test_huber_loss_matches_textbook(huber, delta):
    y, p = data(200)
    # exact kinks: r = 0 and |r| = delta, where both branches must agree on loss and gradient
    y[:3], p[:3] = 0.5, [0.5, 0.5 + delta, 0.5 - delta]
    loss, grad, _ = huber_np(y, p, delta)
    kwargs = {} if delta == 1.0 else {"delta": delta}
    close(huber.loss(y, p, reduction="none", **kwargs), loss)
    close(huber.loss(y, p, reduction="sum", **kwargs), loss.sum())
    close(huber.loss(y, p, reduction="mean", **kwargs), loss.mean())
    close(huber.loss(y, p, **kwargs), loss.mean())  # the default reduction is the mean
    close(huber.grad(y, p, **kwargs), grad)


def test_huber_derivatives_match_textbook(huber):
    y, p = data(200, seed=1)
    y[0] = p[0] = 0.25  # r = 0: gradient 0, Hessian 1
    loss, grad, hess = huber_np(y, p)
    assert 0 < hess.sum() < hess.size  # both branches are exercised
    close(huber.grad(y, p), grad)
    close(huber.hess(y, p), hess)
    g, h = huber.grad_hess(y, p)
    close(g, grad)
    close(h, hess)
    l, g, h = huber.loss_grad_hess(y, p)
    close(l, loss)
    close(g, grad)
    close(h, hess)


def test_mse_matches_textbook():
    mse = lossgen.get("mse")
    y, p = data(50, seed=2)
    loss, grad, hess = mse_np(y, p)
    close(mse.loss(y, p, reduction="none"), loss)
    close(mse.loss(y, p), loss.mean())
    close(mse.grad(y, p), grad)
    close(mse.hess(y, p), hess)


def test_elastic_net_matches_textbook():
    net = lossgen.get("elastic_net")
    assert net.inputs == ("w",)
    w = np.array([-2.0, -0.3, 0.0, 0.4, 3.0])
    loss, grad, hess = elastic_net_np(w, 0.3, 0.5)
    close(net.loss(w, lambda1=0.3, lambda2=0.5, reduction="none"), loss)
    g, h = net.grad_hess(w, lambda1=0.3, lambda2=0.5)
    close(g, grad)
    close(h, hess)
    assert g[2] == 0.0  # sign(0) = 0 at the kink
    # lambda1 = 0 is in the domain 'nonnegative'; a negative one is not
    close(net.loss(w, lambda1=0.0, reduction="none"), elastic_net_np(w, 0.0, 1.0)[0])
    with pytest.raises(ValueError, match="'lambda1'"):
        net.loss(w, lambda1=-0.1)


# --- calling conventions ---------------------------------------------------------------------

def test_inputs_by_keyword(huber):
    y, p = data(20, seed=3)
    loss, grad, _ = huber_np(y, p)
    close(huber.loss(y=y, p=p, reduction="none"), loss)
    close(huber.loss(y, p=p, reduction="none"), loss)
    close(huber.grad(p=p, y=y), grad)  # bound by name, not by keyword order
    with pytest.raises(TypeError, match="'p'"):
        huber.loss(y, p, p=p)
    with pytest.raises(TypeError, match="missing input.*p"):
        huber.loss(y)
    with pytest.raises(TypeError, match="2 arrays"):
        huber.loss(y, p, p)


def test_shape_mismatch_names_inputs_and_shapes(huber):
    with pytest.raises(ValueError) as info:
        huber.loss(np.zeros(3), np.zeros(2))
    message = str(info.value)
    assert re.search(r"\by\b.{0,20}\(3,\)", message), message
    assert re.search(r"\bp\b.{0,20}\(2,\)", message), message
    with pytest.raises(ValueError, match=r"\(2, 3\)"):
        huber.grad(np.zeros((2, 3)), np.zeros((3, 2)))


@pytest.mark.parametrize("bad", [
    np.array(["a", "b", "c"]),
    ["a", "b", "c"],
    np.array([1 + 1j, 2, 3]),
    np.array([1.0, None, 3.0], dtype=object),
    np.array(["2020-01-01"] * 3, dtype="datetime64[D]"),
])
def test_non_numeric_input_is_type_error(huber, bad):
    with pytest.raises(TypeError, match="'p'"):
        huber.loss(np.zeros(3), bad)
    with pytest.raises(TypeError, match="'y'"):
        huber.grad(y=bad, p=np.zeros(3))


def test_wrong_reduction(huber):
    y, p = data(4)
    for reduction in ("avg", None, "MEAN"):
        with pytest.raises(ValueError, match="reduction"):
            huber.loss(y, p, reduction=reduction)
    with pytest.raises(ValueError, match="'avg'"):
        huber.loss_grad_hess(y, p, reduction="avg")


def test_unknown_keyword_is_type_error(huber):
    y, p = data(4)
    with pytest.raises(TypeError, match="'foo'"):
        huber.loss(y, p, foo=1.0)
    with pytest.raises(TypeError, match="'detla'.*did you mean 'delta'"):
        huber.grad(y, p, detla=1.0)


@pytest.mark.parametrize("value", [-1, -1.0, 0.0, np.nan, np.inf, -np.inf])
def test_parameter_outside_domain(huber, value):
    y, p = data(4)
    with pytest.raises(ValueError, match="'delta'"):
        huber.loss(y, p, delta=value)
    with pytest.raises(ValueError, match="'delta'"):
        huber.grad_hess(y, p, delta=value)


@pytest.mark.parametrize("value", [[1.0, 2.0], np.array([1.0]), "1.0", None, 1 + 0j])
def test_non_scalar_parameter_is_type_error(huber, value):
    y, p = data(4)
    with pytest.raises(TypeError, match="'delta'"):
        huber.loss(y, p, delta=value)


def test_numpy_scalar_parameters_accepted(huber):
    y, p = data(30, seed=4)
    expected = huber_np(y, p, 0.5)[0]
    for value in (np.float32(0.5), np.float64(0.5), np.array(0.5)):
        close(huber.loss(y, p, delta=value, reduction="none"), expected)
    close(huber.loss(y, p, delta=2, reduction="none"), huber_np(y, p, 2.0)[0])  # an int


# --- sample weights ------------------------------------------------------------------------

def test_sample_weight(huber):
    y, p = data(40, seed=5)
    w = np.random.default_rng(6).uniform(0, 3, size=40)
    loss, grad, _ = huber_np(y, p)
    close(huber.loss(y, p, sample_weight=w), np.sum(w * loss) / np.sum(w))
    close(huber.loss(y, p, sample_weight=w, reduction="sum"), np.sum(w * loss))
    close(huber.loss(y, p, sample_weight=w, reduction="none"), w * loss)
    close(huber.grad(y, p, sample_weight=w), w * grad)


def test_sample_weight_errors(huber):
    y, p = data(4)
    with pytest.raises(ValueError, match="sample_weight"):
        huber.loss(y, p, sample_weight=np.ones(3))
    with pytest.raises(ValueError, match="sample_weight"):
        huber.grad(y, p, sample_weight=np.ones((4, 1)))
    with pytest.raises(TypeError, match="sample_weight"):
        huber.loss(y, p, sample_weight=np.array(["a"] * 4))


# --- shapes, layouts and dtypes --------------------------------------------------------------

@pytest.mark.parametrize("shape", [(3, 4), (2, 3, 4)])
def test_any_shape(huber, shape):
    y, p = data(shape, seed=7)
    loss, grad, hess = huber_np(y, p)
    out = huber.loss(y, p, reduction="none")
    assert out.shape == shape
    close(out, loss)
    close(huber.loss(y, p), loss.mean())
    assert huber.grad(y, p).shape == shape
    close(huber.grad(y, p), grad)
    assert huber.hess(y, p).shape == shape
    close(huber.hess(y, p), hess)
    for array, expected in zip(huber.grad_hess(y, p), (grad, hess)):
        assert array.shape == shape
        close(array, expected)
    for array, expected in zip(huber.loss_grad_hess(y, p), (loss, grad, hess)):
        assert array.shape == shape
        close(array, expected)


def test_zero_dimensional_inputs(huber):
    loss, grad, hess = huber_np(0.25, 3.0)
    out = huber.loss(np.float64(0.25), np.array(3.0), reduction="none")
    assert np.shape(out) == ()
    close(out, loss)
    close(huber.loss(0.25, 3.0), loss)  # plain Python floats; mean of one element
    g, h = huber.grad_hess(0.25, 3.0)
    assert np.shape(g) == () and np.shape(h) == ()
    close(g, grad)
    close(h, hess)


def test_fortran_and_strided_inputs(huber):
    rng = np.random.default_rng(8)
    base_y, base_p = rng.normal(size=(8, 9)), 2 * rng.normal(size=(8, 9))
    layouts = {
        "fortran": (np.asfortranarray(base_y), np.asfortranarray(base_p)),
        "strided": (base_y[::2, 1::3], base_p[1::2, ::3]),
        "transposed": (base_y.T, base_p.T),
        "mixed": (np.asfortranarray(base_y)[:, ::2], base_p[::-1, ::-2]),
    }
    for name, (y, p) in layouts.items():
        assert not (y.flags.c_contiguous and p.flags.c_contiguous), name
        yc, pc = np.ascontiguousarray(y), np.ascontiguousarray(p)
        loss, grad, hess = huber_np(yc, pc)
        close(huber.loss(y, p, reduction="none"), huber.loss(yc, pc, reduction="none"))
        close(huber.loss(y, p, reduction="none"), loss)
        close(huber.loss(y, p), loss.mean())
        l, g, h = huber.loss_grad_hess(y, p)
        assert l.shape == g.shape == h.shape == y.shape, name
        close(g, grad)
        close(h, hess)


def test_integer_and_bool_inputs(huber):
    y = np.array([0, 1, 2, -3, 5], dtype=np.int32)
    p = np.array([True, False, True, True, False])
    loss, grad, hess = huber_np(y.astype(float), p.astype(float))
    out = huber.loss(y, p, reduction="none")
    assert out.dtype == np.float64
    close(out, loss)
    g = huber.grad([0, 1, 2, -3, 5], p.tolist())  # lists of Python ints and bools
    assert g.dtype == np.float64
    close(g, grad)
    close(huber.loss(y.astype(np.int64), p), loss.mean())
    close(huber.loss(np.array([7, 8], dtype=np.uint8), np.array([7, 5], dtype=np.uint8), reduction="none"), [0.0, 2.5])


def test_float32_in_float32_out(huber):
    y, p = data(100, seed=9)
    y32, p32 = y.astype(np.float32), p.astype(np.float32)
    loss, grad, hess = huber_np(y32, p32)  # truth in float64 from the same float32 values
    out = huber.loss(y32, p32, reduction="none")
    assert out.dtype == np.float32
    close(out, loss, rtol=1e-6, atol=1e-6)
    mean = huber.loss(y32, p32)
    assert isinstance(mean, np.float32)
    close(mean, loss.mean(), rtol=1e-6)
    l, g, h = huber.loss_grad_hess(y32, p32)
    assert l.dtype == g.dtype == h.dtype == np.float32
    close(g, grad, rtol=1e-6, atol=1e-6)
    close(h, hess)
    # one float64 input makes the result float64
    assert huber.loss(y32, p, reduction="none").dtype == np.float64


def test_empty_inputs(huber):
    empty = np.array([])
    assert np.isnan(huber.loss(empty, empty))
    assert np.isnan(huber.loss(empty, empty, reduction="mean"))
    assert huber.loss(empty, empty, reduction="sum") == 0.0
    assert huber.loss(empty, empty, reduction="none").shape == (0,)
    assert huber.grad(np.zeros((0, 3)), np.zeros((0, 3))).shape == (0, 3)
    l, g, h = huber.loss_grad_hess(empty, empty, reduction="mean")
    assert np.isnan(l) and g.shape == h.shape == (0,)
    l, g, h = huber.loss_grad_hess(empty, empty, reduction="sum")
    assert l == 0.0


def test_loss_grad_hess_reduces_only_the_loss(huber):
    y, p = data((5, 6), seed=10)
    loss, grad, hess = huber_np(y, p)
    for reduction, expected in (("sum", loss.sum()), ("mean", loss.mean())):
        l, g, h = huber.loss_grad_hess(y, p, reduction=reduction)
        assert np.ndim(l) == 0
        close(l, expected)
        assert g.shape == h.shape == (5, 6)
        close(g, grad)
        close(h, hess)


def test_inputs_are_not_modified_and_outputs_are_fresh(huber):
    y, p = data(10, seed=11)
    y0, p0 = y.copy(), p.copy()
    l, g, h = huber.loss_grad_hess(y, p)
    g2 = huber.grad(y, p)
    assert np.array_equal(y, y0) and np.array_equal(p, p0)
    for out in (l, g, h, g2):
        assert not np.shares_memory(out, y) and not np.shares_memory(out, p)
    assert not np.shares_memory(g, g2)


def test_outputs_into_given_arrays(huber):
    """out=: the kernels write into the given arrays (the structure the method returns), and
    the method returns those arrays, with the values of a call without out=."""
    y, p = data((4, 5), seed=12)
    loss, grad, hess = huber_np(y, p)
    buffers = [np.full((4, 5), np.nan) for _ in range(3)]
    l, g, h = huber.loss_grad_hess(y, p, out=tuple(buffers))
    assert l is buffers[0] and g is buffers[1] and h is buffers[2]
    close(l, loss), close(g, grad), close(h, hess)
    total, g2, h2 = huber.loss_grad_hess(y, p, reduction="sum", out=buffers)
    close(total, loss.sum()), close(buffers[0], loss)
    g2, h2 = huber.grad_hess(y, p, out=(buffers[1], buffers[2]))
    assert g2 is buffers[1] and h2 is buffers[2]
    for method, expected in ((huber.grad, grad), (huber.hess, hess)):
        out = np.empty((4, 5))
        assert method(y, p, out=out) is out
        close(out, expected)
    out = np.empty((4, 5))
    assert huber.loss(y, p, reduction="none", delta=0.5, out=out) is out
    close(out, huber_np(y, p, delta=0.5)[0])
    single = np.empty((4, 5), dtype=np.float32)
    close(huber.grad(y.astype(np.float32), p.astype(np.float32), out=single), grad, rtol=1e-6, atol=1e-6)
    zero_d = np.empty(())
    assert huber.grad(1.0, 3.0, out=zero_d) is zero_d and zero_d == 1.0


@pytest.mark.parametrize("out, error, match", [
    (np.empty(7), ValueError, r"huber.grad\(\): out must have shape \(4, 5\) and dtype float64, got shape \(7,\)"),
    (np.empty((4, 5), dtype=np.float32), ValueError, "dtype float64"),
    (np.empty((5, 4)).T, ValueError, "C-contiguous"),
    ([1.0] * 5, ValueError, "needs 1 array"),
    ("buffer", TypeError, "must be a NumPy array"),
])
def test_output_buffer_errors(huber, out, error, match):
    y, p = data((4, 5), seed=13)
    with pytest.raises(error, match=match):
        huber.grad(y, p, out=out)


def test_output_buffers_apart_from_the_inputs(huber):
    y, p = data((4, 5), seed=14)
    with pytest.raises(ValueError, match="shares memory with an input"):
        huber.grad(y, p, out=p)
    g = np.empty((4, 5))
    with pytest.raises(ValueError, match=r"out\[1\] shares memory with an input"):
        huber.grad_hess(y, p, out=(g, y))
    with pytest.raises(ValueError, match=r"out\[0\] shares memory with an input"):
        huber.grad_hess(y, p, sample_weight=g, out=(g, np.empty((4, 5))))
    with pytest.raises(ValueError, match=r"out\[0\] must be C-contiguous and writeable"):
        g.flags.writeable = False
        huber.grad_hess(y, p, out=(g, np.empty((4, 5))))
    with pytest.raises(ValueError, match="reduction='none'"):
        huber.loss(y, p, out=np.empty((4, 5)))


# --- import cost ---------------------------------------------------------------------------

def test_import_lossgen_is_light():
    """`import lossgen` loads neither SymPy nor Numba; computing a loss never needs SymPy."""
    code = ("import sys, lossgen\n"
            "assert 'sympy' not in sys.modules and 'numba' not in sys.modules, 'heavy import'\n"
            "names = lossgen.available()\n"
            "assert 'sympy' not in sys.modules and 'numba' not in sys.modules, 'available() too heavy'\n"
            "assert lossgen.get('mse').loss([1.0, 2.0], [2.0, 4.0]) == 2.5\n"
            "assert 'sympy' not in sys.modules, 'a loss needed sympy'\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


# --- domains ---------------------------------------------------------------------------------

def test_outside_the_domain_every_kernel_returns_nan():
    msle = lossgen.get("msle")  # y, p >= 0
    y, p = np.array([1.0, -2.0, 1.0, np.nan]), np.array([1.0, 1.0, -0.5, 1.0])
    loss, grad, hess = msle.loss_grad_hess(y, p)
    expected_nan = [False, True, True, True]
    for out in (loss, grad, hess, msle.grad(y, p), msle.loss(y, p, reduction="none")):
        assert np.isnan(out).tolist() == expected_nan
    assert np.isnan(msle.loss(y, p))  # and so the mean is nan, not a silent wrong number


def test_check_inputs_names_the_input_and_the_element():
    msle = lossgen.get("msle")
    y = np.array([[1.0, 2.0], [3.0, -4.0]])
    with pytest.raises(ValueError, match=r"input 'y' must be non-negative .*element \(1, 1\) is -4\.0"):
        msle.loss(y, np.ones((2, 2)), check_inputs=True)
    with pytest.raises(ValueError, match=r"input 'p'"):
        msle.grad(np.ones(2), np.array([1.0, np.nan]), check_inputs=True)
    assert msle.loss(np.ones(2), np.ones(2), check_inputs=True) == 0.0
