"""The runtime API: loss objects over generated kernel modules.

Imports only NumPy; Numba loads with the first loss used, and each kernel compiles on its
first call (then comes from Numba's on-disk cache in later processes).

    import lossgen
    huber = lossgen.get("huber")                  # or lossgen.losses.huber
    huber.loss(y, p, delta=1.0, reduction="mean", sample_weight=None)
    huber.grad(y, p); huber.hess(y, p); huber.grad_hess(y, p); huber.loss_grad_hess(y, p)

Outside an input's domain (a probability above 1, a negative count) every kernel returns nan;
with ``check_inputs=True`` such an input raises ValueError instead.

Output buffers: every method that returns arrays takes ``out=``, arrays of the shapes and
dtype it would return, in the same structure (an array, or a tuple such as (grad, hess)); the
kernels write into them and the method returns them. A loop over batches of one size then
allocates nothing: a new array's first write costs page faults, more than the kernel itself
for an arithmetic loss (see the README, Performance).

Kernels specialised at defaults: where a spec marks parameters ``specialise = true``, a call
with each of them at its default runs the kernels generated with those values put in (module
``_<name>_defaults``, imported on first use); any other value runs the general kernels.

Threads: arrays of fewer than ``SERIAL_BELOW[cost]`` elements run in the calling thread
(starting Numba's threads costs more than it saves there; the cost, "arithmetic", "vector" or
"libm", is the generator's mark on each kernel); larger ones run on ``numba.get_num_threads()``
threads (``numba.set_num_threads``, ``NUMBA_NUM_THREADS``), at most ``LOSSGEN_NUM_THREADS``
when that environment variable is set (1: always in the calling thread).
"""
from __future__ import annotations

import difflib
import hashlib
import importlib
import importlib.util
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .domains import DOMAINS
from .paths import GENERATED_DIR

REDUCTIONS = ("none", "sum", "mean")
_NUMERIC_KINDS = "biuf"  # bool, signed and unsigned integers, floats
_KERNEL_DTYPES = (np.dtype(np.float64), np.dtype(np.float32))

# Below this many elements a kernel runs in the calling thread: there, starting Numba's
# threads costs more than it saves. A parallel launch costs ~15-25 us on 2 idle cores; a kernel
# that calls libm (log, a root, ...) spends ~5-20 ns per element, and gains from threads from a
# few thousand elements; one that vectorises with the exponentials of templates/numba_helpers
# (Poisson, logistic: 2-4 ns per element) from a few times 1e4; an arithmetic one (MSE, Huber:
# ~1.5 ns per element, bound by memory) only from ~2e5. The generator marks each kernel's cost (SPEC["costs"]); row-wise kernels count
# N * C elements (N * C * C for the full Hessian, and the product where a block of it is summed
# entry by entry: SPEC["quadratic"]). `python benchmarks/run.py
# --threshold` measures the crossovers; LOSSGEN_NUM_THREADS=1 keeps every call serial.
SERIAL_BELOW = {"arithmetic": 200_000, "vector": 50_000, "libm": 5_000, "row": 20_000}
THREADS_VARIABLE = "LOSSGEN_NUM_THREADS"


@dataclass(slots=True)
class _Call:
    arrays: list          # inputs, flattened, contiguous, in the result dtype
    params: list          # parameter values as Python floats, in spec order
    weight: object        # flattened sample_weight or None
    shape: tuple
    dtype: np.dtype
    module: object = None  # whose kernels run: the loss's, or its kernels specialised at defaults
    size: int = 0         # elements per input (set from the arrays)

    def __post_init__(self):
        self.size = self.arrays[0].size


class _Specialisable:
    """What Loss and RowLoss share about the kernels specialised at defaults (their generated
    ``module`` names them)."""

    _specialised = None

    @property
    def specialised(self):
        """The module of kernels specialised at the defaults (spec key ``specialise``), imported
        on first use; None where the spec marks nothing."""
        if self._specialised is None:
            self._specialised = specialised_module(self.module)
        return self._specialised

    def _specialised_params(self, values: list, left_out=()) -> list | None:
        """``values`` without the marked parameters where a call may run the kernels specialised
        at defaults (every marked parameter at its default, every marked shared input among the
        inputs ``left_out``), else None."""
        marked_inputs, marked_params = self._marked
        if (marked_inputs or marked_params) and all(self.inputs[k] in left_out for k in marked_inputs) \
                and all(values[k] == self._defaults[k] for k in marked_params):
            return [v for k, v in enumerate(values) if k not in marked_params]
        return None


class Loss(_Specialisable):
    """One generated loss. Arrays are passed in the spec's input order (target first)."""

    def __init__(self, module):
        spec = module.SPEC
        self.name = spec["name"]
        self.title = spec["title"]
        self.family = spec["family"]
        self.summary = spec["summary"]
        self.inputs = tuple(name for name, _, _ in spec["inputs"])
        self.predictions = tuple(name for name, role, _ in spec["inputs"] if role == "prediction")
        self.domains = {name: domain for name, _, domain in spec["inputs"]}
        self.params = {name: (default, domain) for name, default, domain in spec["params"]}
        self.module = module
        self.__doc__ = module.__doc__
        self._defaults = parameter_values(f"{self.name}()", self.params, {})  # the spec's defaults, checked
        self._kernels = {}  # (kernel name, id of the module) -> its (serial, parallel) launchers
        self._marked = marked_positions(spec, self.params)  # parameters of the specialised kernels

    def __repr__(self):
        params = ", ".join(f"{k}={d!r}" for k, (d, _) in self.params.items())
        return f"<lossgen loss {self.name}({', '.join(self.inputs)}{'; ' + params if params else ''})>"

    # --- public methods ------------------------------------------------------------------

    def loss(self, *arrays, reduction="mean", sample_weight=None, check_inputs=False, out=None, **kwargs):
        """Loss per element (``reduction="none"``), or its sum or (weighted) mean.

        With ``sample_weight``, element i counts w_i times; ``mean`` is sum(w l) / sum(w).
        ``out``: an array for the losses per element (``reduction="none"`` only).
        """
        self._check_reduction("loss", reduction)
        if out is not None and reduction != "none":
            raise ValueError(f"{self.name}.loss(): out= holds the losses per element; it needs "
                             f"reduction='none', got {reduction!r}")
        call = self._prepare("loss", arrays, kwargs, sample_weight, check_inputs)
        if reduction == "none":
            return self._run("loss", call, out)[0]
        total = _launch(self._launchers("loss_sum", call.module), (*call.arrays, *call.params, call.weight), call.size)
        return call.dtype.type(total if reduction == "sum" else _mean(total, call))

    def grad(self, *arrays, sample_weight=None, check_inputs=False, out=None, **kwargs):
        """d loss_i / d p_i for each element (times w_i); a tuple if there are several predictions."""
        call = self._prepare("grad", arrays, kwargs, sample_weight, check_inputs)
        return self._per_prediction(self._run("grad", call, out))

    def hess(self, *arrays, sample_weight=None, check_inputs=False, out=None, **kwargs):
        """d2 loss_i / d p_i2 for each element (times w_i); a tuple if there are several predictions."""
        call = self._prepare("hess", arrays, kwargs, sample_weight, check_inputs)
        return self._per_prediction(self._run("hess", call, out))

    def grad_hess(self, *arrays, sample_weight=None, check_inputs=False, out=None, **kwargs):
        """(grad, hess) in one pass, as needed by boosting custom objectives."""
        call = self._prepare("grad_hess", arrays, kwargs, sample_weight, check_inputs)
        outs = self._run("grad_hess", call, out)
        k = len(self.predictions)
        return self._per_prediction(outs[:k]), self._per_prediction(outs[k:])

    def loss_grad_hess(self, *arrays, reduction="none", sample_weight=None, check_inputs=False, out=None,
                       **kwargs):
        """(loss, grad, hess) in one fused pass. ``reduction`` applies to the loss only;
        gradients and Hessians are always per element (``out``'s first array holds the
        losses per element either way)."""
        self._check_reduction("loss_grad_hess", reduction)
        call = self._prepare("loss_grad_hess", arrays, kwargs, sample_weight, check_inputs)
        outs = self._run("loss_grad_hess", call, out)
        k = len(self.predictions)
        loss = outs[0]
        if reduction != "none":
            total = np.sum(loss, dtype=np.float64)
            loss = call.dtype.type(total if reduction == "sum" else _mean(total, call))
        return loss, self._per_prediction(outs[1:1 + k]), self._per_prediction(outs[1 + k:])

    # --- plumbing ------------------------------------------------------------------------

    def _per_prediction(self, outs):
        return outs[0] if len(outs) == 1 else tuple(outs)

    def _check_reduction(self, method, reduction):
        check_reduction(self.name, method, reduction)

    def _launchers(self, kernel, module):
        """``kernel_launchers`` of ``kernel`` in ``module``, looked up once."""
        key = (kernel, id(module))
        if key not in self._kernels:
            self._kernels[key] = kernel_launchers(module, kernel)
        return self._kernels[key]

    def _run(self, kernel, call, out=None):
        count, flat_shape = self.module.SPEC["kernels"][kernel], len(call.shape) == 1
        if out is None:
            flat = [np.empty(call.size, dtype=call.dtype) for _ in range(count)]
            shaped = flat if flat_shape else [o.reshape(call.shape) for o in flat]
        else:
            shaped = output_buffers(f"{self.name}.{kernel}()", out, [call.shape] * count, call.dtype,
                                    [*call.arrays, call.weight])
            flat = shaped if flat_shape else [o.reshape(-1) for o in shaped]
        _launch(self._launchers(kernel, call.module), (*call.arrays, *call.params, call.weight, *flat), call.size)
        return shaped

    def _prepare(self, method, arrays, kwargs, sample_weight, check_inputs=False) -> _Call:
        if sample_weight is None and not check_inputs and len(arrays) == len(self.inputs):
            call = self._prepare_fast(method, arrays, kwargs)
            if call is not None:
                return call
        where = f"{self.name}.{method}()"
        bound, params = bind_arguments(where, self.inputs, self.params, arrays, kwargs)
        missing = [name for name in self.inputs if name not in bound]
        if missing:
            raise TypeError(f"{where} missing input array(s): {', '.join(missing)}")

        checked = {name: _numeric_array(where, name, bound[name]) for name in self.inputs}
        shape = checked[self.inputs[0]].shape
        for name, array in checked.items():
            if array.shape != shape:
                shapes = ", ".join(f"{n} {a.shape}" for n, a in checked.items())
                raise ValueError(f"{where}: input shapes differ: {shapes}")
        if check_inputs:
            for name, array in checked.items():
                check_domain(where, name, array, DOMAINS[self.domains[name]])
        floats = [a.dtype for a in checked.values() if a.dtype.kind == "f"]
        dtype = np.dtype(np.float32 if floats and all(d == np.float32 for d in floats) else np.float64)
        flat = [np.ascontiguousarray(a, dtype=dtype).reshape(-1) for a in checked.values()]

        weight = None
        if sample_weight is not None:
            weight = _numeric_array(where, "sample_weight", sample_weight)
            if weight.shape != shape:
                raise ValueError(f"{where}: sample_weight has shape {weight.shape}, inputs have shape {shape}")
            weight = np.ascontiguousarray(weight, dtype=dtype).reshape(-1)

        return self._choose(_Call(flat, parameter_values(where, self.params, params), weight, shape, dtype))

    def _prepare_fast(self, method, arrays, kwargs) -> _Call | None:
        """The common call, validated in a few microseconds: every input passed by position
        as a C-contiguous float64 (or every one float32) ndarray of one shape, no weights,
        parameters (if any) by keyword. None where the full path of :meth:`_prepare` is needed;
        both give the same result."""
        first = arrays[0]
        if type(first) is not np.ndarray:
            return None
        dtype, shape = first.dtype, first.shape
        if dtype not in _KERNEL_DTYPES:
            return None
        for array in arrays:
            if type(array) is not np.ndarray or array.dtype != dtype or array.shape != shape \
                    or not array.flags.c_contiguous:
                return None
        if kwargs:
            if any(key not in self.params for key in kwargs):
                return None  # inputs by name, or an unknown keyword: the full path explains
            values = parameter_values(f"{self.name}.{method}()", self.params, kwargs)
        else:
            values = self._defaults
        flat = list(arrays) if len(shape) == 1 else [a.reshape(-1) for a in arrays]
        return self._choose(_Call(flat, values, None, shape, dtype))

    def _choose(self, call: _Call) -> _Call:
        """The call on the kernels specialised at defaults where every marked parameter has its
        default (without those parameters), else on the general kernels."""
        specialised = self._specialised_params(call.params)
        if specialised is None:
            call.module = self.module
        else:
            call.module, call.params = self.specialised, specialised
        return call


def output_buffers(where, out, shapes, dtype, inputs) -> list[np.ndarray]:
    """The arrays of ``out`` (an array, or nested tuples of them in the structure a method
    returns), checked against the outputs' ``shapes`` and ``dtype``: writeable, C-contiguous,
    and apart from the ``inputs`` (a kernel that wrote into an input could read it again: a
    row-wise kernel passes over its row more than once, and an elementwise one reads the sample
    weight after its first output). Outputs that share memory with each other are the
    caller's choice: the last one written wins."""
    if type(out) is np.ndarray:
        flat = [out]
    elif type(out) is tuple and all(type(a) is np.ndarray for a in out):
        flat = list(out)
    else:
        flat = list(_flattened(out))
    if len(flat) != len(shapes):
        raise ValueError(f"{where}: out= needs {len(shapes)} array(s) in the structure the method returns, "
                         f"got {len(flat)}")
    for k, (array, shape) in enumerate(zip(flat, shapes)):
        if type(array) is np.ndarray and array.shape == shape and array.dtype == dtype \
                and array.flags.c_contiguous and array.flags.writeable:
            continue
        name = f"out[{k}]" if len(flat) > 1 else "out"
        if type(array) is not np.ndarray:
            raise TypeError(f"{where}: {name} must be a NumPy array, got {type(array).__name__}")
        if array.shape != shape or array.dtype != dtype:
            raise ValueError(f"{where}: {name} must have shape {shape} and dtype {dtype}, "
                             f"got shape {array.shape} and dtype {array.dtype}")
        raise ValueError(f"{where}: {name} must be C-contiguous and writeable")
    for k, array in enumerate(flat):
        for other in inputs:
            if other is not None and np.may_share_memory(array, other):
                name = f"out[{k}]" if len(flat) > 1 else "out"
                raise ValueError(f"{where}: {name} shares memory with an input")
    return flat


def _flattened(item):
    if isinstance(item, (tuple, list)):
        for part in item:
            yield from _flattened(part)
    else:
        yield item


def check_reduction(name, method, reduction):
    if reduction not in REDUCTIONS:
        raise ValueError(f"{name}.{method}(): reduction must be one of "
                         f"{', '.join(map(repr, REDUCTIONS))}, got {reduction!r}")


def bind_arguments(where, inputs, parameters, arrays, kwargs) -> tuple[dict, dict]:
    """Arrays by position and keyword, parameters by keyword: ({input: array}, {param: value})."""
    if len(arrays) > len(inputs):
        raise TypeError(f"{where} takes {len(inputs)} arrays ({', '.join(inputs)}), got {len(arrays)}")
    bound, params = dict(zip(inputs, arrays)), {}
    for key, value in kwargs.items():
        if key in inputs:
            if key in bound:
                raise TypeError(f"{where} got input '{key}' both by position and by keyword")
            bound[key] = value
        elif key in parameters:
            params[key] = value
        else:
            known = list(inputs) + list(parameters) + ["sample_weight"]
            close = difflib.get_close_matches(key, known, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise TypeError(f"{where} got an unexpected keyword argument '{key}'{hint}; "
                            f"inputs: {', '.join(inputs)}; parameters: {', '.join(parameters) or 'none'}")
    return bound, params


def parameter_values(where, parameters, given) -> list:
    """Parameter values in spec order, as floats: ``given`` or the default, each checked to be
    a real number in its domain (``parameters``: {name: (default, domain)})."""
    values = []
    for name, (default, domain) in parameters.items():
        value = given.get(name, default)
        if type(value) is not float:  # a Python float needs no conversion (np.ndim costs 1-2 us)
            if isinstance(value, (str, bytes)) or np.ndim(value) != 0:
                raise TypeError(f"{where}: parameter '{name}' must be a real number, got {value!r}")
            try:
                value = float(value)
            except (TypeError, ValueError):
                raise TypeError(f"{where}: parameter '{name}' must be a real number, got {value!r}") from None
        if not DOMAINS[domain].contains(value):
            raise ValueError(f"{where}: parameter '{name}' must be {DOMAINS[domain].text}, got {value!r}")
        values.append(value)
    return values


def check_domain(where, name, array, domain):
    """ValueError naming the first element of ``array`` outside ``domain`` (check_inputs=True)."""
    outside = ~domain.mask(array.astype(np.float64, copy=False))
    if outside.any():
        index = np.unravel_index(np.argmax(outside), array.shape) if array.ndim else ()
        raise ValueError(f"{where}: input '{name}' must be {domain.text}; "
                         f"element {tuple(int(i) for i in index)} is {array[index].item()!r}")


def marked_positions(spec: dict, params: dict) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Positions of the inputs and of the parameters (in spec order) marked ``specialise = true``,
    read from a generated module's ``SPEC``."""
    marked = spec.get("specialised", (None, ()))[1]
    inputs = [entry[0] for entry in spec["inputs"]]
    return (tuple(k for k, name in enumerate(inputs) if name in marked),
            tuple(k for k, name in enumerate(params) if name in marked))


def specialised_module(module):
    """The module of ``module``'s kernels specialised at defaults, named in its ``SPEC`` and kept
    next to it; None where its spec marks nothing."""
    entry = module.SPEC.get("specialised")
    return None if entry is None else importlib.import_module(f".{entry[0]}", module.__package__)


def kernel_launchers(module, kernel: str, cost: str | None = None) -> tuple:
    """The generated module's (serial, parallel) launchers of ``kernel`` (NAME_kernel loops in
    the calling thread, NAME_kernel_parallel on Numba's threads) and the kernel's cost class,
    the key of ``SERIAL_BELOW``: ``cost`` where given, else the one that the module's SPEC marks
    ("libm" where it marks none)."""
    if cost is None:
        cost = module.SPEC.get("costs", {}).get(kernel, "libm")
    return getattr(module, f"{kernel}_kernel"), getattr(module, f"{kernel}_kernel_parallel"), cost


def _launch(launchers: tuple, arguments: tuple, size: int):
    """Call an array kernel (``kernel_launchers``' triple): in the calling thread below
    ``SERIAL_BELOW[cost]`` elements, else on ``numba.get_num_threads()`` threads, at most
    ``LOSSGEN_NUM_THREADS`` when it is set."""
    serial, parallel, cost = launchers
    if size < SERIAL_BELOW[cost]:
        return serial(*arguments)
    numba = sys.modules["numba"]  # loaded with the kernel's module
    threads = numba.get_num_threads()
    limit = _thread_limit()
    if limit is not None and limit < threads:
        if limit == 1:
            return serial(*arguments)
        numba.set_num_threads(limit)
        try:
            return parallel(*arguments)
        finally:
            numba.set_num_threads(threads)
    return parallel(*arguments) if threads > 1 else serial(*arguments)


def _thread_limit() -> int | None:
    """``LOSSGEN_NUM_THREADS`` as a positive int, or None when it is unset or empty."""
    text = os.environ.get(THREADS_VARIABLE, "").strip()
    if not text:
        return None
    try:
        limit = int(text)
    except ValueError:
        limit = 0
    if limit < 1:
        raise ValueError(f"{THREADS_VARIABLE} must be a positive integer, got {text!r}")
    return limit


def _mean(total: float, call: _Call) -> float:
    """A (weighted) sum over the elements divided by their count (total weight); nan for none."""
    count = call.size if call.weight is None else float(np.sum(call.weight, dtype=np.float64))
    return total / count if count else np.nan


def _numeric_array(where, name, value) -> np.ndarray:
    try:
        array = np.asarray(value)
    except Exception as error:  # ragged lists and the like
        raise TypeError(f"{where}: '{name}' is not an array: {error}") from None
    if array.dtype.kind not in _NUMERIC_KINDS:
        raise TypeError(f"{where}: '{name}' must be a real numeric array, got dtype {array.dtype}")
    return array


class Catalog:
    """The losses of one generated folder (``lossgen generate --out FOLDER``)."""

    def __init__(self, folder):
        self.folder = Path(folder).resolve()
        init = self.folder / "__init__.py"
        if not init.is_file():
            raise FileNotFoundError(f"{self.folder} holds no generated kernels; "
                                    f"run `lossgen generate --out {folder}` first")
        self._package = "_lossgen_kernels_" + hashlib.sha256(str(self.folder).encode()).hexdigest()[:12]
        if self._package not in sys.modules:
            spec = importlib.util.spec_from_file_location(
                self._package, init, submodule_search_locations=[str(self.folder)])
            package = importlib.util.module_from_spec(spec)
            sys.modules[self._package] = package
            spec.loader.exec_module(package)
        self._losses = dict(sys.modules[self._package].LOSSES)
        self._loaded: dict[str, Loss] = {}

    def available(self) -> list[str]:
        return sorted(self._losses)

    def get(self, name: str) -> Loss:
        if name not in self._losses:
            close = difflib.get_close_matches(str(name), self._losses, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ValueError(f"unknown loss {name!r}{hint}; available: {', '.join(self.available())}")
        if name not in self._loaded:
            module = importlib.import_module(f"{self._package}.{name}")
            self._loaded[name] = (RowLoss if module.SPEC.get("rowwise") else Loss)(module)
        return self._loaded[name]

    def __contains__(self, name):
        return name in self._losses

    def __iter__(self):
        return iter(self.available())

    def __repr__(self):
        return f"<lossgen catalog {self.folder}: {len(self._losses)} losses>"


from .runtime_rows import RowLoss  # noqa: E402  (it builds on this module's helpers)

_catalogs: dict[Path, Catalog] = {}


def load(folder=GENERATED_DIR) -> Catalog:
    """The catalog of generated kernels in ``folder`` (default: this checkout's ``generated/``)."""
    key = Path(folder).resolve()
    if key not in _catalogs:
        _catalogs[key] = Catalog(key)
    return _catalogs[key]


def get(name: str) -> Loss:
    """A loss of the built-in catalog, by name."""
    return load().get(name)


def available() -> list[str]:
    """Names of the losses in the built-in catalog."""
    return load().available()
