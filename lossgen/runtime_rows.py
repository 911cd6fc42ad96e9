"""The runtime API of row-wise losses (softmax cross-entropy, Dice, triplet, ...).

A row-wise loss reads whole rows: inputs over its axis have shape (..., C), one row per
leading index (C known at call time), per-row inputs the leading shape, shared inputs
(class weights) shape (C,).

    sce = lossgen.get("softmax_cross_entropy")
    sce.loss(y, s, reduction="mean")       # y: class indices (N,), s: logits (N, C)
    sce.grad(y, s)                          # (N, C); a tuple with several predictions
    sce.hess(y, s)                          # the Hessian's diagonal, (N, C)
    sce.hess(y, s, full=True)               # every row's (C, C) Hessian, (N, C, C)
    sce.hvp(y, s, v=v)                      # Hessian times v per row, never forming it
    sce.grad(y, s, out=g)                   # into an array g of the result's shape and dtype

Kernels specialised at defaults (spec key ``specialise``): a call with every marked parameter
at its default and every marked shared input left out runs the kernels generated with those
values put in; any other call runs the general kernels.

Threads as for elementwise losses (see lossgen.runtime): inputs of fewer than SERIAL_BELOW["row"]
elements (N * C) run in the calling thread, larger ones on numba.get_num_threads() threads, at
most LOSSGEN_NUM_THREADS.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .domains import DOMAINS
from .runtime import (_launch, _numeric_array, _Specialisable, bind_arguments, check_domain, check_reduction,
                      kernel_launchers, marked_positions, output_buffers, parameter_values)


@dataclass
class _RowCall:
    arrays: list          # inputs in spec order: (N, C), (C,) or (N,) arrays
    params: list
    weight: object        # (N,) sample weights or None
    leading: tuple        # the shape of the rows' index, () for one row
    columns: int          # C
    dtype: np.dtype
    module: object        # whose kernels run: the loss's, or its kernels specialised at defaults


class RowLoss(_Specialisable):
    """One generated row-wise loss. Arrays are passed in the spec's input order."""

    rowwise = True

    def __init__(self, module):
        spec = module.SPEC
        self.name, self.title, self.family = spec["name"], spec["title"], spec["family"]
        self.summary, self.axis = spec["summary"], spec["axis"]
        self._inputs = [dict(zip(("name", "role", "domain", "axis", "shared", "default"), entry))
                        for entry in spec["inputs"]]
        self.inputs = tuple(i["name"] for i in self._inputs)
        self.predictions = tuple(i["name"] for i in self._inputs if i["role"] == "prediction")
        self.params = {name: (default, domain) for name, default, domain in spec["params"]}
        self.module = module
        self.__doc__ = module.__doc__
        self._defaults = parameter_values(f"{self.name}()", self.params, {})
        self._marked = marked_positions(spec, self.params)  # (inputs, parameters) of the specialised kernels

    def __repr__(self):
        shapes = ", ".join(f"{i['name']} {self._shape_text(i)}" for i in self._inputs)
        return f"<lossgen row-wise loss {self.name}({shapes})>"

    # --- public methods ------------------------------------------------------------------

    def loss(self, *arrays, reduction="mean", sample_weight=None, check_inputs=False, out=None, **kwargs):
        """Loss per row (``reduction="none"``, the rows' leading shape), or its sum or
        (weighted) mean over rows. ``out``: an array for the losses per row (any reduction:
        the kernel computes them first)."""
        check_reduction(self.name, "loss", reduction)
        call = self._prepare("loss", arrays, kwargs, sample_weight, check_inputs)
        (per_row,) = self._run("loss", call, out=out)
        return self._reduce(per_row, reduction, call)

    def grad(self, *arrays, sample_weight=None, check_inputs=False, out=None, **kwargs):
        """d loss_row / d x for each prediction x, shaped like x; a tuple if there are several."""
        call = self._prepare("grad", arrays, kwargs, sample_weight, check_inputs)
        return self._per_prediction(self._run("grad", call, out=out))

    def hess(self, *arrays, full=False, sample_weight=None, check_inputs=False, out=None, **kwargs):
        """The Hessian's diagonal, shaped like the prediction; with ``full=True`` every row's
        (C, C) Hessian, shape (..., C, C) (with several predictions, blocks[a][b] between
        predictions a and b)."""
        call = self._prepare("hess", arrays, kwargs, sample_weight, check_inputs)
        if not full:
            return self._per_prediction(self._run("hess", call, out=out))
        blocks = self._run("hess_full", call, full=True, out=out)
        k = len(self.predictions)
        if k == 1:
            return blocks[0]
        return tuple(tuple(blocks[a * k + b] for b in range(k)) for a in range(k))

    def grad_hess(self, *arrays, sample_weight=None, check_inputs=False, out=None, **kwargs):
        """(grad, Hessian diagonal) in one pass over each row."""
        call = self._prepare("grad_hess", arrays, kwargs, sample_weight, check_inputs)
        outs = self._run("grad_hess", call, out=out)
        k = len(self.predictions)
        return self._per_prediction(outs[:k]), self._per_prediction(outs[k:])

    def loss_grad_hess(self, *arrays, reduction="none", sample_weight=None, check_inputs=False, out=None,
                       **kwargs):
        """(loss, grad, Hessian diagonal) in one fused pass; ``reduction`` applies to the loss
        (``out``'s first array holds the losses per row either way)."""
        check_reduction(self.name, "loss_grad_hess", reduction)
        call = self._prepare("loss_grad_hess", arrays, kwargs, sample_weight, check_inputs)
        outs = self._run("loss_grad_hess", call, out=out)
        k = len(self.predictions)
        return (self._reduce(outs[0], reduction, call), self._per_prediction(outs[1:1 + k]),
                self._per_prediction(outs[1 + k:]))

    def hvp(self, *arrays, v, sample_weight=None, check_inputs=False, out=None, **kwargs):
        """The Hessian of each row times ``v`` (shaped like the prediction; a tuple, one per
        prediction, if there are several), without forming the Hessian."""
        call = self._prepare("hvp", arrays, kwargs, sample_weight, check_inputs)
        directions = v if isinstance(v, tuple) else (v,)
        if len(directions) != len(self.predictions):
            raise ValueError(f"{self.name}.hvp(): v needs one array per prediction "
                             f"({', '.join(self.predictions)}), got {len(directions)}")
        flat = []
        for name, direction in zip(self.predictions, directions):
            array = _numeric_array(f"{self.name}.hvp()", "v", direction)
            if array.shape != call.leading + (call.columns,):
                raise ValueError(f"{self.name}.hvp(): v for '{name}' has shape {array.shape}, "
                                 f"expected {call.leading + (call.columns,)}")
            flat.append(np.ascontiguousarray(array, dtype=call.dtype).reshape(-1, call.columns))
        return self._per_prediction(self._run("hvp", call, extra=flat, out=out))

    # --- plumbing ------------------------------------------------------------------------

    def _shape_text(self, entry) -> str:
        if not entry["axis"]:
            return "(N,)"
        return "(C,)" if entry["shared"] else "(N, C)"

    def _per_prediction(self, outs):
        return outs[0] if len(outs) == 1 else tuple(outs)

    def _reduce(self, per_row, reduction, call):
        if reduction == "none":
            return per_row
        total = np.sum(per_row, dtype=np.float64)
        if reduction == "sum":
            return call.dtype.type(total)
        count = per_row.size if call.weight is None else float(np.sum(call.weight, dtype=np.float64))
        return call.dtype.type(total / count if count else np.nan)

    def _run(self, kernel, call, extra=(), full=False, out=None):
        rows = int(np.prod(call.leading, dtype=np.int64))
        c = call.columns
        shapes = []
        for quantity in range(self.module.SPEC["kernels"][kernel]):
            is_loss = kernel in ("loss", "loss_grad_hess") and quantity == 0
            shapes.append((rows,) if is_loss else (rows, c, c) if full else (rows, c))
        if out is None:
            outs = [np.empty(shape, dtype=call.dtype) for shape in shapes]
            shaped = [o.reshape(call.leading + o.shape[1:]) for o in outs]
        else:
            shaped = output_buffers(f"{self.name}.{kernel}()", out, [call.leading + s[1:] for s in shapes],
                                    call.dtype, [*call.arrays, *extra, call.weight])
            outs = [o.reshape(s) for o, s in zip(shaped, shapes)]
        # what decides serial or parallel: N C, N C**2 for the kernels that the generator marks
        # quadratic (the full Hessian, a product summed entry by entry)
        work = rows * c * (c if kernel in call.module.SPEC.get("quadratic", ("hess_full", "hvp")) else 1)
        _launch(kernel_launchers(call.module, kernel, "row"), (*call.arrays, *call.params, *extra, call.weight, *outs), work)
        return shaped

    def _prepare(self, method, arrays, kwargs, sample_weight, check_inputs) -> _RowCall:
        where = f"{self.name}.{method}()"
        bound, params = bind_arguments(where, self.inputs, self.params, arrays, kwargs)
        for entry in self._inputs:
            if entry["name"] not in bound and entry["default"] is not None and entry["shared"]:
                bound[entry["name"]] = None  # filled in once C is known
        left_out = [name for name, value in bound.items() if value is None]
        missing = [name for name in self.inputs if name not in bound]
        if missing:
            raise TypeError(f"{where} missing input array(s): {', '.join(missing)}")

        checked = {name: None if value is None else _numeric_array(where, name, value)
                   for name, value in bound.items()}
        first = next(i for i in self._inputs if i["axis"] and not i["shared"])
        reference = checked[first["name"]]
        if reference.ndim < 1:
            raise ValueError(f"{where}: '{first['name']}' must have the {self.axis} axis last, shape (..., C)")
        leading, columns = reference.shape[:-1], reference.shape[-1]
        if columns == 0:
            raise ValueError(f"{where}: '{first['name']}' has no elements along the {self.axis} axis (C = 0)")
        expected = {}
        for entry in self._inputs:
            name = entry["name"]
            shape = (columns,) if entry["shared"] else leading + (columns,) if entry["axis"] else leading
            expected[name] = shape
            if checked[name] is None:
                continue  # a default, filled in below in the result's dtype
            if checked[name].shape != shape:
                shapes = ", ".join(f"{n} {a.shape}" for n, a in checked.items() if a is not None)
                raise ValueError(f"{where}: input '{name}' has shape {checked[name].shape}, expected {shape} "
                                 f"(C = {columns} from '{first['name']}'); shapes: {shapes}")
        floats = [a.dtype for a in checked.values() if a is not None and a.dtype.kind == "f"]
        dtype = np.dtype(np.float32 if floats and all(d == np.float32 for d in floats) else np.float64)
        for entry in self._inputs:
            if checked[entry["name"]] is None:
                checked[entry["name"]] = np.full(expected[entry["name"]], entry["default"], dtype=dtype)
        flat = []
        for entry in self._inputs:
            name, array = entry["name"], checked[entry["name"]]
            if entry["domain"] == "class_index":
                flat.append(_class_index(where, name, array, columns).reshape(-1))
                continue
            if check_inputs:
                check_domain(where, name, array, DOMAINS[entry["domain"]])
            array = np.ascontiguousarray(array, dtype=dtype)
            flat.append(array if entry["shared"] else array.reshape(-1, columns) if entry["axis"] else array.reshape(-1))

        weight = None
        if sample_weight is not None:
            weight = _numeric_array(where, "sample_weight", sample_weight)
            if weight.shape != leading:
                raise ValueError(f"{where}: sample_weight has shape {weight.shape}, one weight per row "
                                 f"needs shape {leading}")
            weight = np.ascontiguousarray(weight, dtype=dtype).reshape(-1)
        values = parameter_values(where, self.params, params)
        specialised = self._specialised_params(values, left_out)
        if specialised is not None:
            flat = [a for k, a in enumerate(flat) if k not in self._marked[0]]
            return _RowCall(flat, specialised, weight, leading, columns, dtype, self.specialised)
        return _RowCall(flat, values, weight, leading, columns, dtype, self.module)


def _class_index(where, name, array, columns) -> np.ndarray:
    """Integer class indices in [0, C), always checked: an index outside would read outside the row."""
    if array.dtype.kind not in "iu":
        if array.dtype.kind == "f" and np.all(np.isfinite(array)) and np.all(array == np.round(array)):
            array = array.astype(np.int64)
        else:
            raise TypeError(f"{where}: '{name}' holds class indices and must be an integer array, "
                            f"got dtype {array.dtype}")
    if array.size and (array.min() < 0 or array.max() >= columns):
        bad = array[(array < 0) | (array >= columns)].flat[0]
        raise ValueError(f"{where}: '{name}' must hold class indices in [0, {columns}), got {bad}")
    return np.ascontiguousarray(array, dtype=np.int64)
