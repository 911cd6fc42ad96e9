"""Adapters: generated kernels inside XGBoost, LightGBM, SciPy, PyTorch and Dask.

Every adapter works for every loss of the right shape, with no per-loss code:

- boosting and SciPy need a *supervised* loss: inputs ``(target, prediction)``, elementwise
  (one margin per sample) or row-wise (``rowwise = True``: a margin per sample and class);
- ``least_squares_loss`` needs a loss of one prediction alone, the squared residual
  (``cauchy_rho``);
- PyTorch and Dask take any loss.

Each library is imported only when its adapter is called. Loss parameters are keyword
arguments, checked (names and domains) when the adapter is made, not at the first iteration.

Boosting Hessians (``hessian_floor``, ``hessian_fill``): a booster divides by the summed
Hessian of a leaf, so where a loss's Hessian is zero or negative (everywhere for ``mae``,
``quantile``, ``hinge``; in Huber's tails; beyond delta for ``cauchy``) the adapters replace
every per-sample Hessian ``h <= hessian_floor`` (default 1e-16, XGBoost's own floor for its
logistic objective) by ``hessian_fill * w`` (default 1, times the sample weight): a bounded
gradient step there, the unit Hessian that XGBoost's and LightGBM's built-in L1 and quantile
objectives use. Elsewhere the exact Hessian is used, so a strictly convex loss (squared error,
cross-entropy) trains exactly as with the library's built-in objective.
"""
from __future__ import annotations

import difflib
import string
import types
from pathlib import Path

import numpy as np

from .domains import DOMAINS

__all__ = [
    "xgboost_objective", "xgboost_metric", "lightgbm_objective", "lightgbm_metric",
    "scipy_objective", "robust_fit", "least_squares_loss", "torch_loss", "dask_loss",
]

# How a boosting library's labels become a target in the loss's domain, by domain (not by
# loss): classifiers' labels are 0/1 (XGBClassifier, LGBMClassifier) where hinge, logistic
# and exponential want -1/1. Labels already in {-1, 1} pass unchanged.
_LABEL_FROM_BOOSTER = {
    "label_pm1": lambda y: np.where(y > 0, 1.0, -1.0),
    "class_index": lambda y: np.asarray(y).astype(np.int64),
}


# --- shared plumbing -----------------------------------------------------------------------

def _loss_object(loss):
    """A Loss from a Loss or a catalog name."""
    if isinstance(loss, str):
        from .runtime import get
        return get(loss)
    if not hasattr(loss, "module") or not hasattr(loss, "grad_hess"):
        raise TypeError(f"expected a lossgen loss or its name, got {loss!r}")
    return loss


def _roles(loss):
    """{input: role} of the inputs a caller must pass (row-wise losses may have optional
    shared inputs, such as class weights, which have a default)."""
    return {entry[0]: entry[1] for entry in loss.module.SPEC["inputs"]
            if not (len(entry) > 5 and entry[5] is not None)}


def _domain(loss, name):
    return next(entry[2] for entry in loss.module.SPEC["inputs"] if entry[0] == name)


def _rowwise(loss) -> bool:
    return bool(getattr(loss, "rowwise", False))


def _check_params(loss, params, where):
    """Unknown names raise TypeError, values outside their domain ValueError, now."""
    for key, value in params.items():
        if key not in loss.params:
            close = difflib.get_close_matches(key, list(loss.params), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise TypeError(f"{where}: {loss.name} has no parameter '{key}'{hint}; "
                            f"its parameters: {', '.join(loss.params) or 'none'}")
        domain = DOMAINS[loss.params[key][1]]
        try:
            ok = np.ndim(value) == 0 and not isinstance(value, (str, bytes)) and domain.contains(float(value))
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise ValueError(f"{where}: parameter '{key}' of {loss.name} must be {domain.text}, got {value!r}")
    return dict(params)


def _supervised(loss, where):
    """Check that ``loss`` takes (target, prediction): what boosting and SciPy fit."""
    roles = _roles(loss)
    if list(roles.values()) != ["target", "prediction"]:
        shape = ", ".join(f"{n} ({r})" for n, r in roles.items())
        raise ValueError(f"{where} needs a loss of a target and one prediction, (target, prediction); "
                         f"{loss.name} takes {shape}")
    return loss


class _CatalogRef:
    def __init__(self, folder, name):
        self.folder, self.name = folder, name


class _Bound:
    """A loss with its parameters, picklable (Dask ships it to workers by catalog folder and name)."""

    def __init__(self, loss, params, where):
        self.base = _loss_object(loss)
        self.params = _check_params(self.base, params, where)
        self.where = where

    def __getstate__(self):
        state = dict(self.__dict__)
        if isinstance(self.base.module, types.ModuleType):  # a generated module does not pickle: send where it lives
            state["base"] = _CatalogRef(str(Path(self.base.module.__file__).parent), self.base.name)
        return state

    def __setstate__(self, state):
        if isinstance(state["base"], _CatalogRef):
            from .runtime import load
            state = dict(state, base=load(state["base"].folder).get(state["base"].name))
        self.__dict__.update(state)

    @property
    def rowwise(self):
        return _rowwise(self.base)


class _Boosting(_Bound):
    """Gradient and floored Hessian of a supervised loss at a booster's raw margins."""

    def __init__(self, loss, params, where, hessian_floor, hessian_fill):
        super().__init__(loss, params, where)
        _supervised(self.base, where)
        if not (hessian_floor >= 0 and hessian_fill > 0):
            raise ValueError(f"{where}: hessian_floor must be >= 0 and hessian_fill > 0, "
                             f"got {hessian_floor!r}, {hessian_fill!r}")
        self.hessian_floor, self.hessian_fill = float(hessian_floor), float(hessian_fill)
        self.__name__ = self.base.name  # the metric's name in XGBoost's and LightGBM's logs

    def _target(self, labels):
        convert = _LABEL_FROM_BOOSTER.get(_domain(self.base, self.base.inputs[0]))
        return convert(labels) if convert else np.asarray(labels, dtype=np.float64)

    def _margins(self, labels, preds):
        preds = np.asarray(preds, dtype=np.float64)
        n = len(labels)
        if self.rowwise:
            if preds.ndim == 1 and n and preds.size % n == 0:
                preds = preds.reshape(n, -1)
            if preds.ndim != 2 or preds.shape[0] != n:
                raise ValueError(f"{self.where}: row-wise loss {self.base.name} needs margins of shape "
                                 f"(n_samples, n_classes) = ({n}, C); got {preds.shape} "
                                 f"(set num_class in XGBoost, num_class with objective multiclass in LightGBM)")
        elif preds.shape != (n,):
            raise ValueError(f"{self.where}: {self.base.name} takes one margin per sample, got margins of "
                             f"shape {preds.shape} for {n} labels (a multi-class booster needs a row-wise loss)")
        return preds

    def grad_hess(self, labels, preds, weight=None):
        """(grad, hess) of the loss at the margins, weighted, with the Hessian floor applied."""
        y = self._target(labels)
        preds = self._margins(y, preds)
        w = None if weight is None or np.size(weight) == 0 else np.asarray(weight, dtype=np.float64)
        g, h = self.base.grad_hess(y, preds, **self.params)
        if w is not None:
            wide = w[:, None] if self.rowwise else w
            g, h = g * wide, h * wide
        else:
            wide = 1.0
        h = np.where(h > self.hessian_floor, h, self.hessian_fill * np.broadcast_to(wide, h.shape))
        return g, h

    def value(self, labels, preds, weight=None):
        """The (weighted) mean loss at the margins."""
        y = self._target(labels)
        w = None if weight is None or np.size(weight) == 0 else weight
        return float(self.base.loss(y, self._margins(y, preds), sample_weight=w, **self.params))


class _XGBoostObjective(_Boosting):
    def __call__(self, a, b, sample_weight=None):
        if hasattr(b, "get_label"):                 # xgb.train(obj=...): (margins, DMatrix)
            return self.grad_hess(b.get_label(), a, b.get_weight())
        return self.grad_hess(a, b, sample_weight)  # sklearn API: (y_true, margins, sample_weight)


class _XGBoostMetric(_Boosting):
    def __call__(self, a, b, sample_weight=None):
        if hasattr(b, "get_label"):                 # xgb.train(custom_metric=...): (name, value)
            return self.base.name, self.value(b.get_label(), a, b.get_weight())
        return self.value(a, b, sample_weight)      # sklearn API eval_metric: a float


class _LightGBMObjective(_Boosting):
    def __call__(self, a, b, weight=None):
        if hasattr(b, "get_label"):                 # lgb.train, params["objective"]: (margins, Dataset)
            return self.grad_hess(b.get_label(), a, b.get_weight())
        return self.grad_hess(a, b, weight)         # sklearn API: (y_true, margins, weight)


class _LightGBMMetric(_Boosting):
    def __call__(self, a, b, weight=None):
        if hasattr(b, "get_label"):                 # lgb.train(feval=...): (margins, Dataset)
            return self.base.name, self.value(b.get_label(), a, b.get_weight()), False
        return self.base.name, self.value(a, b, weight), False


def xgboost_objective(loss, *, hessian_floor=1e-16, hessian_fill=1.0, **params):
    """XGBoost custom objective: per-sample (per sample and class) gradient and Hessian of
    ``loss`` at the raw margins. Use as ``xgb.train(..., obj=f)``, ``xgboost.dask.train(...,
    obj=f)`` or ``XGBRegressor(objective=f)``; Hessians <= ``hessian_floor`` become
    ``hessian_fill`` times the weight. Set ``base_score`` yourself (the first margin)."""
    return _XGBoostObjective(loss, params, "xgboost_objective()", hessian_floor, hessian_fill)


def xgboost_metric(loss, **params):
    """XGBoost evaluation metric: the (weighted) mean of ``loss`` at the raw margins, for
    ``xgb.train(..., custom_metric=m)`` (gives ``(name, value)``) or ``eval_metric=m`` in the
    sklearn API (a float; smaller is better)."""
    return _XGBoostMetric(loss, params, "xgboost_metric()", 0.0, 1.0)


def lightgbm_objective(loss, *, hessian_floor=1e-16, hessian_fill=1.0, **params):
    """LightGBM 4 custom objective: per-sample (per sample and class) gradient and Hessian of
    ``loss`` at the raw scores, for ``params["objective"] = f`` in ``lgb.train`` or
    ``LGBMRegressor(objective=f)``; Hessians <= ``hessian_floor`` become ``hessian_fill``
    times the weight. The first scores are 0 (or the Dataset's init_score)."""
    return _LightGBMObjective(loss, params, "lightgbm_objective()", hessian_floor, hessian_fill)


def lightgbm_metric(loss, **params):
    """LightGBM evaluation metric: ``(name, weighted mean loss at the raw scores, False)``, for
    ``lgb.train(..., feval=m)`` or ``eval_metric=m`` in the sklearn API."""
    return _LightGBMMetric(loss, params, "lightgbm_metric()", 0.0, 1.0)


# --- SciPy ------------------------------------------------------------------------------------

class _LinearObjective(_Bound):
    """The mean loss of the linear model ``X @ w`` as a function of ``w`` (flattened (d, C)
    for a row-wise loss), with its gradient, Hessian and Hessian-vector product."""

    def __init__(self, loss, X, y, sample_weight, params):
        super().__init__(loss, params, "scipy_objective()")
        _supervised(self.base, self.where)
        self.X = np.asarray(X, dtype=np.float64)
        if self.X.ndim != 2:
            raise ValueError(f"{self.where}: X must be 2-D (n_samples, n_features), got shape {self.X.shape}")
        convert = _LABEL_FROM_BOOSTER.get(_domain(self.base, self.base.inputs[0]))
        self.y = convert(y) if convert else np.asarray(y, dtype=np.float64)
        if self.y.shape != (self.X.shape[0],):
            raise ValueError(f"{self.where}: y must have shape ({self.X.shape[0]},) to match X, got {self.y.shape}")
        self.w = None if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)
        if self.w is not None and self.w.shape != self.y.shape:
            raise ValueError(f"{self.where}: sample_weight has shape {self.w.shape}, y has {self.y.shape}")
        self.n_classes = None
        if self.rowwise:
            self.n_classes = int(self.y.max()) + 1 if self.y.size else 1
        self.denominator = float(self.y.size if self.w is None else self.w.sum())
        self.size = self.X.shape[1] * (self.n_classes or 1)

    def _scores(self, coef):
        coef = np.asarray(coef, dtype=np.float64)
        if coef.shape != (self.size,):
            raise ValueError(f"{self.where}: coefficients must have shape ({self.size},), got {coef.shape}")
        return self.X @ (coef.reshape(self.X.shape[1], -1) if self.rowwise else coef)

    def _weighted(self, a):
        if self.w is None:
            return a
        return a * (self.w[:, None] if a.ndim == 2 else self.w[:, None, None] if a.ndim == 3 else self.w)

    def fun(self, coef):
        """Weighted mean loss."""
        losses = self.base.loss(self.y, self._scores(coef), reduction="none", **self.params)
        return float(np.sum(self._weighted(losses)) / self.denominator)

    def jac(self, coef):
        """Gradient with respect to the coefficients."""
        g = self._weighted(self.base.grad(self.y, self._scores(coef), **self.params))
        return (self.X.T @ g).reshape(-1) / self.denominator

    def hess(self, coef):
        """Full Hessian with respect to the coefficients."""
        s = self._scores(coef)
        if self.rowwise:
            h = self._weighted(self.base.hess(self.y, s, full=True, **self.params))   # (N, C, C)
            d, c = self.X.shape[1], self.n_classes
            return np.einsum("na,nij,nb->aibj", self.X, h, self.X).reshape(d * c, d * c) / self.denominator
        h = self._weighted(self.base.hess(self.y, s, **self.params))
        return (self.X.T * h) @ self.X / self.denominator

    def hessp(self, coef, v):
        """Hessian times the vector ``v``."""
        s = self._scores(coef)
        sv = self._scores(v)
        if self.rowwise:
            hv = self.base.hvp(self.y, s, v=sv, **self.params)
        else:
            hv = self.base.hess(self.y, s, **self.params) * sv
        return (self.X.T @ self._weighted(hv)).reshape(-1) / self.denominator

    def __call__(self, coef):
        return self.fun(coef)

    def minimize_kwargs(self):
        """``fun``, ``jac`` and ``hessp`` for ``scipy.optimize.minimize(**kwargs, x0=...)``."""
        return {"fun": self.fun, "jac": self.jac, "hessp": self.hessp}


def scipy_objective(loss, X, y, *, sample_weight=None, **params):
    """``scipy.optimize.minimize`` objective of a linear model: ``fun(w)`` is the (weighted)
    mean of ``loss(y_i, X_i @ w)``, with ``.jac``, ``.hess`` and ``.hessp`` (w has shape
    (n_features,), or (n_features * C,) for a row-wise loss, W = w.reshape(n_features, C)).
    Add a column of ones to X for an intercept."""
    return _LinearObjective(loss, X, y, sample_weight, params)


def robust_fit(loss, X, y, *, sample_weight=None, x0=None, method="trust-ncg", options=None, **params):
    """Fit a linear model by minimising the mean ``loss`` with SciPy (Newton-type, using the
    generated gradient and Hessian-vector products), starting from the least-squares fit.
    Returns SciPy's ``OptimizeResult``; the coefficients are ``.x``."""
    from scipy.optimize import minimize
    objective = scipy_objective(loss, X, y, sample_weight=sample_weight, **params)
    if x0 is None:
        x0 = np.zeros(objective.size)
        if not objective.rowwise:
            x0 = np.linalg.lstsq(objective.X, objective.y, rcond=None)[0]
    kwargs = objective.minimize_kwargs()
    if method not in ("Newton-CG", "trust-ncg", "trust-krylov", "trust-constr"):
        kwargs.pop("hessp")
    return minimize(x0=np.asarray(x0, dtype=np.float64), method=method, options=options or {}, **kwargs)


class _RhoOfSquares(_Bound):
    def __init__(self, loss, params):
        super().__init__(loss, params, "least_squares_loss()")
        if list(_roles(self.base).values()) != ["prediction"]:
            raise ValueError(f"least_squares_loss() needs a loss of the squared residual alone, such as "
                             f"cauchy_rho; {self.base.name} takes {', '.join(self.base.inputs)}")

    def __call__(self, z):
        rho, d1, d2 = self.base.loss_grad_hess(np.asarray(z, dtype=np.float64), **self.params)
        return np.stack([rho, d1, d2])


def least_squares_loss(loss, **params):
    """A robust kernel for ``scipy.optimize.least_squares(..., loss=f)``: ``f(z)`` returns
    ``[rho(z), rho'(z), rho''(z)]`` of a loss of the squared residual z (``cauchy_rho``)."""
    return _RhoOfSquares(loss, params)


# --- PyTorch ---------------------------------------------------------------------------------

def _numpy_view(tensor, name, where):
    import torch
    if not isinstance(tensor, torch.Tensor):
        tensor = torch.as_tensor(tensor)
    if tensor.device.type != "cpu":
        raise ValueError(f"{where}: '{name}' is on {tensor.device}; the generated kernels run on CPU tensors")
    return tensor.detach().numpy()          # shares memory with the tensor


_TORCH_FUNCTION = None


def _torch_function():
    """The autograd.Function (made on the first torch_loss, so that torch loads only then)."""
    global _TORCH_FUNCTION
    if _TORCH_FUNCTION is None:
        import torch
        from torch.autograd.function import once_differentiable

        class GeneratedLoss(torch.autograd.Function):
            """forward: the generated loss kernel on NumPy views of the tensors; backward: the
            generated gradient (saved by the fused forward pass) times the incoming gradient."""

            @staticmethod
            def forward(ctx, bound, reduction, weight, *tensors):
                loss = bound.base
                arrays = [_numpy_view(t, n, bound.where) for t, n in zip(tensors, loss.inputs)]
                w = None if weight is None else _numpy_view(weight, "weight", bound.where)
                slots = [loss.inputs.index(n) for n in loss.predictions]
                ctx.wanted = [i for i in slots if ctx.needs_input_grad[3 + i]]
                if ctx.wanted:
                    values, grads, _ = loss.loss_grad_hess(*arrays, sample_weight=w, **bound.params)
                    grads = grads if len(slots) > 1 else (grads,)
                    ctx.grads = {i: torch.from_numpy(np.asarray(g)) for i, g in zip(slots, grads)}
                else:
                    values = loss.loss(*arrays, reduction="none", sample_weight=w, **bound.params)
                ctx.n, ctx.reduction, ctx.scale = len(tensors), reduction, 1.0
                if reduction == "none":
                    return torch.from_numpy(np.asarray(values))
                if reduction == "mean":
                    ctx.scale = 1.0 / (values.size if w is None else float(np.sum(w, dtype=np.float64)))
                dtype = torch.from_numpy(np.asarray(values)).dtype
                return torch.tensor(np.sum(values, dtype=np.float64) * ctx.scale, dtype=dtype)

            @staticmethod
            @once_differentiable
            def backward(ctx, grad_output):
                out = [None] * (3 + ctx.n)
                for i in ctx.wanted:
                    g = ctx.grads[i]
                    upstream = grad_output.reshape(grad_output.shape + (1,) * (g.ndim - grad_output.ndim))
                    out[3 + i] = upstream * g * ctx.scale if ctx.scale != 1.0 else upstream * g
                return tuple(out)

        _TORCH_FUNCTION = GeneratedLoss
    return _TORCH_FUNCTION


def torch_loss(loss, *, reduction="mean", **params):
    """A ``torch.nn.Module`` computing ``loss`` with the generated kernels on CPU tensors (shared
    with NumPy, no copy) and returning the generated gradient in backward (first order only).

    A (target, prediction) loss is called as torch's losses are, ``module(input, target)``;
    any other loss with its inputs in the spec's order. ``weight=`` (optional keyword) weights
    each element; ``reduction`` is ``"mean"`` (sum(w l) / sum(w)), ``"sum"`` or ``"none"``.
    No gradient flows to targets or to inputs that are not predictions."""
    import torch
    from .runtime import REDUCTIONS

    bound = _Bound(loss, params, "torch_loss()")
    if reduction not in REDUCTIONS:
        raise ValueError(f"torch_loss(): reduction must be one of {', '.join(map(repr, REDUCTIONS))}, "
                         f"got {reduction!r}")
    function = _torch_function()
    torch_order = list(_roles(bound.base).values()) == ["target", "prediction"]

    class GeneratedLossModule(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bound, self.reduction = bound, reduction

        def forward(self, *tensors, weight=None):
            names, required = bound.base.inputs, len(_roles(bound.base))
            if not required <= len(tensors) <= len(names):
                order = ("input, target" if torch_order else ", ".join(names[:required])) + (
                    f"; optionally {', '.join(names[required:])}" if len(names) > required else "")
                raise TypeError(f"{bound.base.name} loss takes {required} tensors ({order}), got {len(tensors)}")
            if torch_order:                 # torch's (input, target) -> lossgen's (target, prediction)
                tensors = (tensors[1], tensors[0]) + tensors[2:]
            return function.apply(bound, reduction, weight, *tensors)

        def extra_repr(self):
            values = ", ".join(f"{k}={v!r}" for k, v in bound.params.items())
            return f"{bound.base.name}, reduction={reduction!r}" + (f", {values}" if values else "")

    GeneratedLossModule.__name__ = GeneratedLossModule.__qualname__ = f"{bound.base.name}_loss"
    return GeneratedLossModule()


# --- Dask ------------------------------------------------------------------------------------

class _DaskLoss(_Bound):
    """The runtime API on Dask arrays: each method maps the kernel over the blocks."""

    def _blocks(self, arrays, sample_weight):
        """The arrays (and weight) with aligned blocks, and their blockwise index strings; a
        row-wise loss's class axis is made one chunk, so that blocks split rows only."""
        import dask.array as da
        arrays = [da.asarray(a) for a in arrays]
        if sample_weight is not None:
            arrays.append(da.asarray(sample_weight))
        if self.rowwise:
            rows = next(a for a in arrays if a.ndim == 2)
            arrays = [a.rechunk({0: rows.chunks[0], 1: -1}) if a.ndim == 2 else a.rechunk({0: rows.chunks[0]})
                      for a in arrays]
        else:
            shapes = {a.shape for a in arrays}
            if len(shapes) > 1:
                raise ValueError(f"dask_loss: {self.base.name}: input shapes differ: {sorted(shapes)}")
        indices = [string.ascii_lowercase[:a.ndim] for a in arrays]
        pairs = [x for a, i in zip(arrays, indices) for x in (a, i)]
        return pairs, (max(indices, key=len), indices[0] if not self.rowwise else "a")

    def _map(self, method, arrays, sample_weight, per_row=False, **kwargs):
        import dask.array as da
        pairs, (full, row) = self._blocks(arrays, sample_weight)
        n = len(self.base.inputs)
        weighted = sample_weight is not None
        call = {**self.params, **kwargs}

        def block(*blocks):
            w = blocks[n] if weighted else None
            return getattr(self.base, method)(*blocks[:n], sample_weight=w, **call)

        floats = [a.dtype for a in pairs[::2] if a.dtype.kind == "f"]
        dtype = np.float32 if floats and all(d == np.float32 for d in floats) else np.float64
        return da.blockwise(block, row if per_row else full, *pairs, dtype=dtype, concatenate=True)

    def loss(self, *arrays, reduction="mean", sample_weight=None):
        """Per-element (per-row) losses, or their sum or weighted mean, as a lazy Dask array."""
        import dask.array as da
        values = self._map("loss", arrays, sample_weight, per_row=True, reduction="none")
        if reduction == "none":
            return values
        total = values.sum()
        if reduction == "sum":
            return total
        if reduction != "mean":
            raise ValueError(f"dask_loss: reduction must be 'none', 'sum' or 'mean', got {reduction!r}")
        return total / (values.size if sample_weight is None else da.asarray(sample_weight).sum())

    def _single(self, method, arrays, sample_weight):
        if len(self.base.predictions) != 1:
            raise ValueError(f"dask_loss: {method} of {self.base.name} (several predictions) is not mapped; "
                             f"use one loss per prediction")
        return self._map(method, arrays, sample_weight)

    def grad(self, *arrays, sample_weight=None):
        """d loss_i / d p_i per element (per element and class), lazily."""
        return self._single("grad", arrays, sample_weight)

    def hess(self, *arrays, sample_weight=None):
        """Diagonal Hessian per element (per element and class), lazily."""
        return self._single("hess", arrays, sample_weight)

    def grad_hess(self, *arrays, sample_weight=None):
        """(grad, hess), lazily; ``dask.compute(g, h)`` runs each block's kernels once each."""
        return self.grad(*arrays, sample_weight=sample_weight), self.hess(*arrays, sample_weight=sample_weight)


def dask_loss(loss, **params):
    """``loss`` on Dask arrays: ``.loss``, ``.grad``, ``.hess``, ``.grad_hess`` as in the runtime
    API, mapped over blocks (``dask.array.blockwise``) and lazy; a row-wise loss is chunked
    along rows only (its class axis is rechunked to one block)."""
    return _DaskLoss(loss, params, "dask_loss()")
