"""Adapters against the real libraries: XGBoost, LightGBM, SciPy, PyTorch, Dask.

Evidence is independent of lossgen: training with a generated objective is compared with the
library's own built-in objective, PyTorch's functional losses give values and gradients,
SciPy's own robust kernels and finite differences check the SciPy objective. Each library's
tests skip when it is not installed (``pip install -e '.[adapters]'``).

Multi-class paths run twice: with a NumPy softmax cross-entropy written here (a test double
of the row-wise API, independent of the generated code) and with the generated
``softmax_cross_entropy`` once the catalog has it.
"""
from __future__ import annotations

import pickle
import re
from pathlib import Path

import numpy as np
import pytest

import lossgen
from lossgen import adapters

ROOT = Path(__file__).resolve().parent.parent


# --- a row-wise test double: softmax cross-entropy in NumPy, with the row-wise API ------------

class _SoftmaxModule:
    __name__ = "numpy_softmax_cross_entropy"
    SPEC = {"inputs": (("y", "target", "class_index"), ("s", "prediction", "real")), "params": ()}
    __file__ = __file__


class NumpySoftmaxCrossEntropy:
    """logsumexp(s) - s[y] per row, in plain NumPy (the row-wise API of issue 4)."""
    name, rowwise, module = "numpy_softmax_cross_entropy", True, _SoftmaxModule
    inputs, predictions, params = ("y", "s"), ("s",), {}
    domains = {"y": "class_index", "s": "real"}

    @staticmethod
    def _p(y, s):
        y = np.asarray(y).astype(np.int64)
        s = np.asarray(s, dtype=np.float64)
        e = np.exp(s - s.max(axis=1, keepdims=True))
        return y, s, e / e.sum(axis=1, keepdims=True)

    def loss(self, y, s, reduction="mean", sample_weight=None):
        y, s, p = self._p(y, s)
        m = s.max(axis=1)
        rows = m + np.log(np.exp(s - m[:, None]).sum(axis=1)) - s[np.arange(len(y)), y]
        w = np.ones(len(y)) if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)
        if reduction == "none":
            return rows * w
        return (rows * w).sum() / (1.0 if reduction == "sum" else w.sum())

    def grad(self, y, s, sample_weight=None):
        y, s, p = self._p(y, s)
        g = p.copy()
        g[np.arange(len(y)), y] -= 1
        return g if sample_weight is None else g * np.asarray(sample_weight)[:, None]

    def hess(self, y, s, full=False, sample_weight=None):
        y, s, p = self._p(y, s)
        h = np.einsum("ni,ij->nij", p, np.eye(p.shape[1])) - p[:, :, None] * p[:, None, :] if full else p * (1 - p)
        return h if sample_weight is None else h * np.asarray(sample_weight).reshape((-1,) + (1,) * (h.ndim - 1))

    def grad_hess(self, y, s, sample_weight=None):
        return self.grad(y, s, sample_weight=sample_weight), self.hess(y, s, sample_weight=sample_weight)

    def loss_grad_hess(self, y, s, reduction="none", sample_weight=None):
        return (self.loss(y, s, reduction=reduction, sample_weight=sample_weight),) + self.grad_hess(
            y, s, sample_weight=sample_weight)

    def hvp(self, y, s, v):
        y, s, p = self._p(y, s)
        return p * v - p * (p * v).sum(axis=1, keepdims=True)


def _softmax_params():
    yield pytest.param(NumpySoftmaxCrossEntropy(), id="numpy-double")
    yield pytest.param("softmax_cross_entropy", id="generated")


@pytest.fixture(params=list(_softmax_params()))
def softmax(request):
    if isinstance(request.param, str):
        if request.param not in lossgen.available():
            pytest.skip("softmax_cross_entropy is not in the catalog yet (row-wise losses, issue 4)")
        return lossgen.get(request.param)
    return request.param


# --- data ----------------------------------------------------------------------------------

def _data(n=400, d=4, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d))
    return rng, X


def _binary():
    rng, X = _data()
    y = (X[:, 0] - 0.5 * X[:, 1] + 0.7 * rng.normal(size=len(X)) > 0).astype(np.float64)
    return X, y


def _regression():
    rng, X = _data(seed=1)
    return X, X @ np.array([1.0, -2.0, 0.5, 0.0]) + np.sin(3 * X[:, 0]) + 0.3 * rng.normal(size=len(X))


def _multiclass(classes=3):
    rng, X = _data(seed=2)
    scores = X[:, :classes] * 1.5 + rng.normal(size=(len(X), classes))
    return X, np.argmax(scores, axis=1).astype(np.float64)


# --- XGBoost ---------------------------------------------------------------------------------

XGB = {"tree_method": "hist", "max_depth": 3, "eta": 0.3, "nthread": 1, "seed": 0}


def test_xgboost_binary_cross_entropy_matches_builtin_logistic():
    xgb = pytest.importorskip("xgboost")
    X, y = _binary()
    d = xgb.DMatrix(X, label=y)
    evals = {}
    builtin = xgb.train({**XGB, "objective": "binary:logistic", "base_score": 0.5, "eval_metric": "logloss"},
                        d, 15, evals=[(d, "train")], evals_result=evals, verbose_eval=False)
    mine = {}
    custom = xgb.train({**XGB, "base_score": 0.0, "disable_default_eval_metric": 1}, d, 15,
                       obj=adapters.xgboost_objective("binary_cross_entropy_logits"),
                       custom_metric=adapters.xgboost_metric("binary_cross_entropy_logits"),
                       evals=[(d, "train")], evals_result=mine, verbose_eval=False)
    # base_score 0.5 for the built-in logistic objective is a first margin of logit(0.5) = 0
    np.testing.assert_allclose(custom.predict(d, output_margin=True), builtin.predict(d, output_margin=True),
                               rtol=0, atol=1e-6)
    # XGBoost logs a custom metric through "%g" text: 6 significant digits
    np.testing.assert_allclose(mine["train"]["binary_cross_entropy_logits"], evals["train"]["logloss"],
                               rtol=1e-5)


def test_xgboost_squared_error_matches_builtin():
    xgb = pytest.importorskip("xgboost")
    X, y = _regression()
    d = xgb.DMatrix(X, label=y)
    evals, mine = {}, {}
    builtin = xgb.train({**XGB, "objective": "reg:squarederror", "base_score": 0.0, "eval_metric": "rmse"},
                        d, 15, evals=[(d, "train")], evals_result=evals, verbose_eval=False)
    # lossgen's mse is (p - y)^2, twice XGBoost's (p - y)^2 / 2: gradient and Hessian double, so
    # the same trees need reg_lambda and min_child_weight doubled too (leaf = -G / (H + lambda))
    custom = xgb.train({**XGB, "base_score": 0.0, "lambda": 2.0, "min_child_weight": 2.0,
                        "disable_default_eval_metric": 1}, d, 15, obj=adapters.xgboost_objective("mse"),
                       custom_metric=adapters.xgboost_metric("mse"), evals=[(d, "train")],
                       evals_result=mine, verbose_eval=False)
    np.testing.assert_allclose(custom.predict(d), builtin.predict(d), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(mine["train"]["mse"], np.square(evals["train"]["rmse"]), rtol=1e-5)


def test_xgboost_sklearn_api_matches_builtin():
    xgb = pytest.importorskip("xgboost")
    pytest.importorskip("sklearn")
    X, y = _regression()
    w = np.random.default_rng(5).uniform(0.5, 2.0, len(y))
    kw = dict(n_estimators=10, max_depth=3, learning_rate=0.3, n_jobs=1, tree_method="hist", base_score=0.0)
    builtin = xgb.XGBRegressor(objective="reg:squarederror", **kw).fit(X, y, sample_weight=w)
    custom = xgb.XGBRegressor(objective=adapters.xgboost_objective("mse"), reg_lambda=2.0, min_child_weight=2.0,
                              eval_metric=adapters.xgboost_metric("mse"), **kw)
    custom.fit(X, y, sample_weight=w, eval_set=[(X, y)], sample_weight_eval_set=[w], verbose=False)
    np.testing.assert_allclose(custom.predict(X), builtin.predict(X), rtol=1e-6, atol=1e-6)
    history = custom.evals_result()["validation_0"]["mse"]
    assert history[-1] == pytest.approx(np.average((custom.predict(X) - y) ** 2, weights=w), rel=1e-5)


def test_xgboost_softmax_matches_builtin(softmax):
    xgb = pytest.importorskip("xgboost")
    X, y = _multiclass()
    d = xgb.DMatrix(X, label=y)
    base = {**XGB, "num_class": 3, "base_score": 0.0, "lambda": 0.0}
    builtin = xgb.train({**base, "objective": "multi:softprob", "min_child_weight": 1.0}, d, 10)
    # XGBoost's softmax Hessian is 2 p (1 - p), twice the exact diagonal that lossgen returns:
    # with lambda = 0 the same trees come from half the learning rate and min_child_weight
    custom = xgb.train({**base, "eta": XGB["eta"] / 2, "min_child_weight": 0.5}, d, 10,
                       obj=adapters.xgboost_objective(softmax))
    np.testing.assert_allclose(custom.predict(d, output_margin=True), builtin.predict(d, output_margin=True),
                               rtol=0, atol=1e-6)


def test_xgboost_hinge_takes_classifier_labels_and_floor():
    xgb = pytest.importorskip("xgboost")
    pytest.importorskip("sklearn")
    X, y = _binary()
    objective = adapters.xgboost_objective("hinge")
    g, h = objective(y, np.zeros_like(y))                # labels 0/1 are mapped to -1/1
    np.testing.assert_array_equal(g, np.where(y > 0, -1.0, 1.0))
    np.testing.assert_array_equal(h, np.ones_like(y))    # hinge's Hessian is 0: floored to 1 * weight
    # XGBClassifier's base_score is a probability: 0.5 is a first margin of 0
    model = xgb.XGBClassifier(objective=objective, n_estimators=20, max_depth=3, n_jobs=1, base_score=0.5)
    model.fit(X, y)
    margins = model.predict(X, output_margin=True)
    assert np.all(np.isfinite(margins)) and np.mean((margins > 0) == (y > 0)) > 0.8


# --- LightGBM --------------------------------------------------------------------------------

LGB = {"num_leaves": 8, "learning_rate": 0.3, "num_threads": 1, "deterministic": True, "force_row_wise": True,
       "verbose": -1, "seed": 0, "boost_from_average": False}


def _lgb_train(lgb, params, X, y, rounds=15, **kw):
    return lgb.train(params, lgb.Dataset(X, label=y, params={"verbose": -1}), rounds, **kw)


def test_lightgbm_binary_cross_entropy_matches_builtin():
    lgb = pytest.importorskip("lightgbm")
    X, y = _binary()
    builtin = _lgb_train(lgb, {**LGB, "objective": "binary"}, X, y)
    custom = _lgb_train(lgb, {**LGB, "objective": adapters.lightgbm_objective("binary_cross_entropy_logits")}, X, y)
    np.testing.assert_allclose(custom.predict(X, raw_score=True), builtin.predict(X, raw_score=True),
                               rtol=0, atol=1e-6)
    # the metric against LightGBM's own binary_logloss
    data = lgb.Dataset(X, label=y, params={"verbose": -1})
    evals = {}
    lgb.train({**LGB, "objective": adapters.lightgbm_objective("binary_cross_entropy_logits"),
               "metric": "None"}, data, 5, valid_sets=[data], valid_names=["train"],
              feval=adapters.lightgbm_metric("binary_cross_entropy_logits"),
              callbacks=[lgb.record_evaluation(evals)])
    reference = {}
    lgb.train({**LGB, "objective": "binary", "metric": "binary_logloss"}, data, 5, valid_sets=[data],
              valid_names=["train"], callbacks=[lgb.record_evaluation(reference)])
    np.testing.assert_allclose(evals["train"]["binary_cross_entropy_logits"], reference["train"]["binary_logloss"],
                               rtol=1e-6)


def test_lightgbm_squared_error_matches_builtin():
    lgb = pytest.importorskip("lightgbm")
    X, y = _regression()
    builtin = _lgb_train(lgb, {**LGB, "objective": "regression"}, X, y)
    # lossgen's mse doubles LightGBM's L2 gradient and Hessian; with lambda_l2 = 0 (the default)
    # the leaves are the same once min_sum_hessian_in_leaf is doubled too
    custom = _lgb_train(lgb, {**LGB, "objective": adapters.lightgbm_objective("mse"),
                              "min_sum_hessian_in_leaf": 2e-3}, X, y)
    np.testing.assert_allclose(custom.predict(X), builtin.predict(X), rtol=1e-6, atol=1e-6)


@pytest.mark.filterwarnings("ignore:The argument 'eval_set' is deprecated")  # LightGBM 4.7; 4.0-4.6 need it
def test_lightgbm_sklearn_api_with_weights_matches_builtin():
    lgb = pytest.importorskip("lightgbm")
    pytest.importorskip("sklearn")
    X, y = _binary()
    w = np.random.default_rng(6).uniform(0.5, 2.0, len(y))
    kw = dict(n_estimators=10, num_leaves=8, learning_rate=0.3, n_jobs=1, deterministic=True, force_row_wise=True,
              verbose=-1, random_state=0, boost_from_average=False)
    builtin = lgb.LGBMClassifier(objective="binary", **kw).fit(X, y, sample_weight=w)
    custom = lgb.LGBMClassifier(objective=adapters.lightgbm_objective("binary_cross_entropy_logits"), **kw)
    custom.fit(X, y, sample_weight=w, eval_set=[(X, y)], eval_sample_weight=[w],
               eval_metric=adapters.lightgbm_metric("binary_cross_entropy_logits"))
    np.testing.assert_allclose(custom.predict(X, raw_score=True), builtin.predict(X, raw_score=True),
                               rtol=0, atol=1e-6)
    assert "binary_cross_entropy_logits" in custom.evals_result_["training"]


def test_lightgbm_softmax_matches_builtin(softmax):
    lgb = pytest.importorskip("lightgbm")
    X, y = _multiclass()
    classes = 3
    builtin = _lgb_train(lgb, {**LGB, "objective": "multiclass", "num_class": classes}, X, y, 10)
    # LightGBM's multiclass Hessian is k p (1 - p) with k = C / (C - 1); lambda_l2 = 0, so the
    # same trees come from the learning rate and min_sum_hessian_in_leaf divided by k
    k = classes / (classes - 1)
    custom = _lgb_train(lgb, {**LGB, "objective": adapters.lightgbm_objective(softmax), "num_class": classes,
                              "learning_rate": LGB["learning_rate"] / k, "min_sum_hessian_in_leaf": 1e-3 / k},
                        X, y, 10)
    np.testing.assert_allclose(custom.predict(X, raw_score=True), builtin.predict(X, raw_score=True),
                               rtol=0, atol=1e-6)


def test_lightgbm_quantile_with_hessian_floor():
    lgb = pytest.importorskip("lightgbm")
    X, y = _regression()
    # quantile's Hessian is 0 everywhere: floored to 1, each round is a bounded gradient step
    model = _lgb_train(lgb, {**LGB, "objective": adapters.lightgbm_objective("quantile", tau=0.8),
                             "learning_rate": 0.1}, X, y, 200)
    coverage = np.mean(y <= model.predict(X))
    assert np.all(np.isfinite(model.predict(X))) and abs(coverage - 0.8) < 0.05


# --- boosting adapters: checks -----------------------------------------------------------

def test_boosting_floor_is_applied_per_sample_with_weights():
    objective = adapters.lightgbm_objective("huber", delta=1.0, hessian_fill=0.5)
    y = np.array([0.0, 0.0, 0.0])
    g, h = objective(y, np.array([0.5, 3.0, -3.0]), np.array([2.0, 4.0, 0.0]))
    np.testing.assert_array_equal(g, [1.0, 4.0, 0.0])
    np.testing.assert_array_equal(h, [2.0, 2.0, 0.0])   # tails (Hessian 0) -> 0.5 * weight


def test_boosting_errors_are_clear():
    with pytest.raises(ValueError, match="target and one prediction.*dpo takes"):
        adapters.xgboost_objective("dpo")
    with pytest.raises(TypeError, match="no parameter 'dleta'.*did you mean 'delta'"):
        adapters.lightgbm_objective("huber", dleta=2.0)
    with pytest.raises(ValueError, match="'delta' of huber must be positive"):
        adapters.xgboost_objective("huber", delta=-1.0)
    with pytest.raises(ValueError, match="hessian_floor"):
        adapters.xgboost_objective("mse", hessian_fill=0.0)
    with pytest.raises(ValueError, match="one margin per sample.*row-wise loss"):
        adapters.xgboost_objective("mse")(np.zeros(4), np.zeros((4, 3)))
    with pytest.raises(ValueError, match="shape \\(n_samples, n_classes\\)"):
        adapters.xgboost_objective(NumpySoftmaxCrossEntropy())(np.zeros(4), np.zeros(5))


def test_objectives_pickle_by_catalog_reference():
    objective = adapters.xgboost_objective("huber", delta=2.0)
    copy = pickle.loads(pickle.dumps(objective))
    y, p = np.array([0.0, 1.0]), np.array([3.0, 1.5])
    for a, b in zip(copy(y, p), objective(y, p)):
        np.testing.assert_array_equal(a, b)


# --- SciPy -----------------------------------------------------------------------------------

def _line_with_outliers():
    rng = np.random.default_rng(3)
    x = rng.uniform(0, 10, 200)
    y = 2.0 + 0.5 * x + 0.1 * rng.normal(size=x.size)
    outliers = rng.choice(x.size, 30, replace=False)
    y[outliers] += rng.uniform(20, 40, outliers.size)       # one-sided: they drag a least-squares fit
    return np.column_stack([np.ones_like(x), x]), y


@pytest.mark.parametrize("name, params", [("huber", {"delta": 0.2}), ("cauchy", {"delta": 0.5}),
                                          ("barron", {"alpha": 0.0, "c": 0.3})])
def test_robust_fit_recovers_the_line(name, params):
    pytest.importorskip("scipy")
    X, y = _line_with_outliers()
    result = adapters.robust_fit(name, X, y, **params)
    assert result.success
    np.testing.assert_allclose(result.x, [2.0, 0.5], atol=0.1)
    ordinary = adapters.robust_fit("mse", X, y).x
    assert np.max(np.abs(ordinary - [2.0, 0.5])) > 1.0


def test_scipy_objective_derivatives_against_finite_differences(softmax):
    optimize = pytest.importorskip("scipy.optimize")
    rng, X = _data(n=50, d=3, seed=4)
    cases = [("log_cosh", X @ [1.0, -1.0, 0.5] + rng.normal(size=50)), (softmax, _multiclass()[1][:50])]
    for loss, y in cases:
        objective = adapters.scipy_objective(loss, X, y, sample_weight=rng.uniform(0.5, 2, 50))
        w = rng.normal(size=objective.size)
        np.testing.assert_allclose(objective.jac(w), optimize.approx_fprime(w, objective.fun, 1e-7),
                                   rtol=1e-4, atol=1e-6)
        numeric = np.array([optimize.approx_fprime(w, lambda u: objective.jac(u)[i], 1e-7)
                            for i in range(objective.size)])
        np.testing.assert_allclose(objective.hess(w), numeric, rtol=1e-4, atol=1e-6)
        v = rng.normal(size=objective.size)
        np.testing.assert_allclose(objective.hessp(w, v), objective.hess(w) @ v, rtol=1e-10, atol=1e-12)


def test_scipy_softmax_regression_matches_sklearn(softmax):
    pytest.importorskip("scipy")
    linear_model = pytest.importorskip("sklearn.linear_model")
    X, y = _multiclass()
    Xb = np.column_stack([X, np.ones(len(X))])
    result = adapters.robust_fit(softmax, Xb, y, method="trust-ncg", options={"gtol": 1e-10})
    scores = Xb @ result.x.reshape(Xb.shape[1], -1)
    reference = linear_model.LogisticRegression(C=np.inf, tol=1e-10, max_iter=10000).fit(X, y)
    mine = np.exp(scores - scores.max(axis=1, keepdims=True))
    np.testing.assert_allclose(mine / mine.sum(axis=1, keepdims=True), reference.predict_proba(X), atol=1e-5)


def test_least_squares_loss_matches_scipy_cauchy():
    optimize = pytest.importorskip("scipy.optimize")
    X, y = _line_with_outliers()

    def residuals(w):
        return X @ w - y

    builtin = optimize.least_squares(residuals, np.zeros(2), loss="cauchy", f_scale=0.5)
    mine = optimize.least_squares(residuals, np.zeros(2), loss=adapters.least_squares_loss("cauchy_rho", delta=0.5))
    np.testing.assert_allclose(mine.x, builtin.x, rtol=1e-8)
    np.testing.assert_allclose(mine.x, [2.0, 0.5], atol=0.1)
    with pytest.raises(ValueError, match="squared residual alone"):
        adapters.least_squares_loss("cauchy")


def test_scipy_errors_are_clear():
    with pytest.raises(ValueError, match="X must be 2-D"):
        adapters.scipy_objective("mse", np.zeros(3), np.zeros(3))
    with pytest.raises(ValueError, match="y must have shape \\(3,\\)"):
        adapters.scipy_objective("mse", np.zeros((3, 2)), np.zeros(4))
    with pytest.raises(ValueError, match="coefficients must have shape \\(2,\\)"):
        adapters.scipy_objective("mse", np.zeros((3, 2)), np.zeros(3)).fun(np.zeros(3))


# --- PyTorch ---------------------------------------------------------------------------------

def _real(rng, shape):
    return rng.normal(size=shape) * 2


def _probability(rng, shape):
    return rng.uniform(0.02, 0.98, shape)


def _label01(rng, shape):
    return rng.integers(0, 2, shape).astype(np.float64)


def _label_pm1(rng, shape):
    return np.where(rng.integers(0, 2, shape) > 0, 1.0, -1.0)


def _count(rng, shape):
    return rng.poisson(3.0, shape).astype(np.float64)


# lossgen loss, its parameters, torch.nn.functional loss, its keyword arguments (from the
# parameters), sampler of the target, sampler of the prediction. Checked against specs/:
# mse (p - y)^2, mae |p - y|, smooth_l1 and huber as torch's, binary_cross_entropy on
# probabilities (epsilon 0), binary_cross_entropy_logits with pos_weight, poisson exp(p) - y p
# (torch's log_input=True, full=False), logistic log(1 + exp(-y p)) (soft_margin_loss).
# Not paired: hinge (torch's hinge_embedding_loss is a different loss), focal_binary
# (torchvision, not torch.nn.functional).
TORCH_PAIRS = [
    ("mse", {}, "mse_loss", {}, _real, _real),
    ("mae", {}, "l1_loss", {}, _real, _real),
    ("smooth_l1", {"beta": 0.7}, "smooth_l1_loss", {"beta": 0.7}, _real, _real),
    ("huber", {"delta": 1.5}, "huber_loss", {"delta": 1.5}, _real, _real),
    ("binary_cross_entropy", {}, "binary_cross_entropy", {}, _probability, _probability),
    ("binary_cross_entropy", {}, "binary_cross_entropy", {}, _label01, _probability),
    ("binary_cross_entropy_logits", {"pos_weight": 3.0}, "binary_cross_entropy_with_logits",
     {"pos_weight": 3.0}, _probability, _real),
    ("poisson", {}, "poisson_nll_loss", {"log_input": True, "full": False}, _count, _real),
    ("logistic", {}, "soft_margin_loss", {}, _label_pm1, _real),
]


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("name, params, function, kwargs, target, prediction", TORCH_PAIRS,
                         ids=[f"{p[0]}-{p[2]}-{p[4].__name__[1:]}" for p in TORCH_PAIRS])
def test_torch_loss_matches_functional(name, params, function, kwargs, target, prediction, reduction):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    rng = np.random.default_rng(7)
    for dtype, rtol in ((torch.float64, 1e-12), (torch.float32, 1e-4)):   # torch's float32 is the coarser
        y = torch.tensor(target(rng, (6, 5)), dtype=dtype)
        x_mine = torch.tensor(prediction(rng, (6, 5)), dtype=dtype, requires_grad=True)
        x_ref = x_mine.detach().clone().requires_grad_(True)
        extra = {k: torch.tensor(v, dtype=dtype) if k == "pos_weight" else v for k, v in kwargs.items()}
        mine = adapters.torch_loss(name, reduction=reduction, **params)(x_mine, y)
        reference = getattr(F, function)(x_ref, y, reduction=reduction, **extra)
        assert mine.dtype == dtype and mine.shape == reference.shape
        np.testing.assert_allclose(mine.detach().numpy(), reference.detach().numpy(), rtol=rtol, atol=1e-12)
        upstream = torch.tensor(rng.uniform(0.5, 2.0, mine.shape), dtype=dtype)
        mine.backward(upstream)
        reference.backward(upstream)
        np.testing.assert_allclose(x_mine.grad.numpy(), x_ref.grad.numpy(), rtol=rtol, atol=1e-12)


def test_torch_loss_weights_match_functional_bce_sum():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(8)
    y = torch.tensor(_label01(rng, 20))
    p = torch.tensor(_probability(rng, 20), requires_grad=True)
    w = torch.tensor(rng.uniform(0.5, 2.0, 20))
    mine = adapters.torch_loss("binary_cross_entropy", reduction="sum")(p, y, weight=w)
    mine.backward()
    grad = p.grad.clone()
    p.grad = None
    reference = torch.nn.functional.binary_cross_entropy(p, y, weight=w, reduction="sum")
    reference.backward()
    assert mine.item() == pytest.approx(reference.item(), rel=1e-12)
    np.testing.assert_allclose(grad.numpy(), p.grad.numpy(), rtol=1e-12)
    # mean with weights is sum(w l) / sum(w)
    weighted_mean = adapters.torch_loss("binary_cross_entropy")(p, y, weight=w)
    assert weighted_mean.item() == pytest.approx(reference.item() / w.sum().item(), rel=1e-12)


def test_torch_loss_softmax_matches_cross_entropy(softmax):
    torch = pytest.importorskip("torch")
    if isinstance(softmax, NumpySoftmaxCrossEntropy):
        pytest.skip("the torch adapter is checked on the generated kernels")
    rng = np.random.default_rng(9)
    logits = torch.tensor(rng.normal(size=(8, 4)) * 3, requires_grad=True)
    labels = torch.tensor(rng.integers(0, 4, 8))
    for reduction in ("mean", "sum", "none"):
        mine = adapters.torch_loss(softmax, reduction=reduction)(logits, labels)
        mine.sum().backward()
        grad = logits.grad.clone()
        logits.grad = None
        reference = torch.nn.functional.cross_entropy(logits, labels, reduction=reduction)
        reference.sum().backward()
        np.testing.assert_allclose(mine.detach().numpy(), reference.detach().numpy(), rtol=1e-12)
        np.testing.assert_allclose(grad.numpy(), logits.grad.numpy(), rtol=1e-12, atol=1e-15)
        logits.grad = None


def test_torch_loss_shares_memory_and_trains():
    torch = pytest.importorskip("torch")
    y = torch.linspace(-1, 1, 16)
    p = torch.zeros(16, requires_grad=True)
    assert adapters._numpy_view(p, "p", "test").ctypes.data == p.data_ptr()   # zero-copy view
    optimizer = torch.optim.SGD([p], lr=0.5)
    module = adapters.torch_loss("huber", delta=0.5, reduction="sum")
    for _ in range(50):
        optimizer.zero_grad()
        module(p, y).backward()
        optimizer.step()
    np.testing.assert_allclose(p.detach().numpy(), y.numpy(), atol=1e-3)


def test_torch_loss_several_predictions_and_errors():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(10)
    real = torch.tensor(rng.normal(size=6), requires_grad=True)
    fake = torch.tensor(rng.normal(size=6), requires_grad=True)
    module = adapters.torch_loss("gan_discriminator")          # spec order: its two predictions
    module(real, fake).backward()
    sp = torch.nn.functional.softplus
    r2, f2 = real.detach().clone().requires_grad_(True), fake.detach().clone().requires_grad_(True)
    (sp(-r2) + sp(f2)).mean().backward()                       # -log D(real) - log(1 - D(fake)), D = sigmoid
    np.testing.assert_allclose(real.grad.numpy(), r2.grad.numpy(), rtol=1e-12)
    np.testing.assert_allclose(fake.grad.numpy(), f2.grad.numpy(), rtol=1e-12)
    with pytest.raises(TypeError, match="takes 2 tensors \\(input, target\\), got 1"):
        adapters.torch_loss("mse")(real)
    with pytest.raises(ValueError, match="reduction must be one of"):
        adapters.torch_loss("mse", reduction="avg")
    with pytest.raises(TypeError, match="no parameter 'beta'"):
        adapters.torch_loss("huber", beta=1.0)


# --- Dask ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def dask_client():
    pytest.importorskip("dask.array")
    distributed = pytest.importorskip("distributed")
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=False,
                                  dashboard_address=None) as cluster, distributed.Client(cluster) as client:
        yield client


def test_dask_kernels_over_blocks(dask_client, softmax):
    import dask
    import dask.array as da
    rng = np.random.default_rng(11)
    y, p, w = rng.normal(size=(3, 1000))
    w = np.abs(w)
    huber = lossgen.get("huber")
    mapped = adapters.dask_loss("huber", delta=0.5)
    dy, dp, dw = (da.from_array(a, chunks=c) for a, c in ((y, 300), (p, 250), (w, 400)))  # unaligned blocks
    g, h = dask.compute(*mapped.grad_hess(dy, dp, sample_weight=dw))
    gr, hr = huber.grad_hess(y, p, delta=0.5, sample_weight=w)
    np.testing.assert_array_equal(g, gr)
    np.testing.assert_array_equal(h, hr)
    assert float(mapped.loss(dy, dp, sample_weight=dw).compute()) == pytest.approx(
        huber.loss(y, p, delta=0.5, sample_weight=w), rel=1e-12)
    # row-wise: blocks split along rows only, whatever the class-axis chunks
    labels, scores = rng.integers(0, 5, 600), rng.normal(size=(600, 5))
    rowwise = adapters.dask_loss(softmax)
    dl, ds = da.from_array(labels, chunks=250), da.from_array(scores, chunks=(200, 2))
    np.testing.assert_allclose(rowwise.grad(dl, ds).compute(), softmax.grad(labels, scores), rtol=1e-14)
    np.testing.assert_allclose(rowwise.loss(dl, ds, reduction="none").compute(),
                               softmax.loss(labels, scores, reduction="none"), rtol=1e-14)


def test_xgboost_dask_trains_with_generated_objective(dask_client):
    xgb = pytest.importorskip("xgboost")
    pytest.importorskip("xgboost.dask")
    import dask.array as da
    X, y = _regression()
    dX, dy = da.from_array(X, chunks=(100, 4)), da.from_array(y, chunks=100)
    dtrain = xgb.dask.DaskDMatrix(dask_client, dX, dy)
    params = {**XGB, "base_score": 0.0}
    builtin = xgb.dask.train(dask_client, {**params, "objective": "reg:squarederror"}, dtrain, 10)
    custom = xgb.dask.train(dask_client, {**params, "lambda": 2.0, "min_child_weight": 2.0}, dtrain, 10,
                            obj=adapters.xgboost_objective("mse"))
    np.testing.assert_allclose(xgb.dask.predict(dask_client, custom, dX).compute(),
                               xgb.dask.predict(dask_client, builtin, dX).compute(), rtol=1e-6, atol=1e-6)


# --- README ----------------------------------------------------------------------------------

def _readme_section_code():
    text = (ROOT / "README.md").read_text()
    match = re.search(r"^## Training with other libraries\n(.*?)(?=^## )", text, re.S | re.M)
    assert match, "README has no 'Training with other libraries' section"
    return re.findall(r"```python\n(.*?)```", match.group(1), re.S)


def test_readme_examples_run():
    for module in ("xgboost", "lightgbm", "scipy", "torch", "dask.array", "sklearn"):
        pytest.importorskip(module)
    blocks = _readme_section_code()
    assert len(blocks) >= 4
    namespace = {}
    for block in blocks:
        exec(compile(block, "README.md", "exec"), namespace)
    # what the README's comments claim
    np.testing.assert_allclose(namespace["p"].grad.numpy(), [0.0, -0.1, -0.1, -0.1, -0.1], atol=1e-7)
    X, y = namespace["X"], namespace["y"]
    np.testing.assert_allclose(adapters.robust_fit("cauchy", X, y, delta=0.5).x, [2.0, 0.5], atol=0.1)
    assert np.max(np.abs(adapters.robust_fit("mse", X, y).x - [2.0, 0.5])) > 1.0
