"""lossgen: a symbolic compiler for loss functions.

A loss is declared once in a spec file; lossgen derives its gradient and Hessian, rewrites
them into numerically stable forms, and emits Numba kernels, verified in high precision.
The pipeline, one module per stage: spec -> derive -> stabilise -> emit -> verify.

    import lossgen
    lossgen.available()                   # names of the built-in losses
    huber = lossgen.get("huber")          # or lossgen.losses.huber
    huber.loss(y, p, delta=1.0)           # mean loss
    g, h = huber.grad_hess(y, p)          # per-element gradient and Hessian
    mine = lossgen.load("my_generated")   # kernels generated from your own specs
"""
from . import losses
from .runtime import Catalog, Loss, available, get, load

__version__ = "0.1.0"
__all__ = ["Catalog", "Loss", "available", "get", "load", "losses"]
