"""Row-wise vocabulary: reductions over a loss's axis (classes, features), whose length C is
known only at run time.

A row-wise spec declares inputs over an axis (``axis = "class"``); inside an expression an
axis input stands for one element of the row, and a reduction turns an element expression
into one value per row. Five primitive reductions are SymPy functions here; every other
spec function of this module is written in terms of them:

==================  =========================================  ==========================
spec function       meaning                                    built as
==================  =========================================  ==========================
``sum(e)``          sum over the row                           rowsum(e)
``mean(e)``         sum / C                                    rowsum(e) / C
``max(e)``          largest element (first one on ties)        rowmax(e)
``min(e)``          smallest element (first one on ties)       rowmin(e)
``logsumexp(e)``    log sum exp, computed with the max shifted logsumexp(e)
``take(e, y)``      element y of the row (y a class index)     take(e, y)
``onehot(y)``       1 at element y of the row, else 0          onehot(y)
``dot(a, b)``       sum(a*b)                                   rowsum(a*b)
``norm(a)``         Euclidean norm sqrt(sum(a**2))             sqrt(rowsum(a**2))
``softmax(e)``      exp(e - logsumexp(e))                      exp(e - logsumexp(e))
``log_softmax(e)``  e - logsumexp(e)                           e - logsumexp(e)
``size(e)``         the row's length C                         ROW_SIZE
==================  =========================================  ==========================

The derivation stage (:mod:`lossgen.derive_rows`) lowers these into a row program.
"""
from __future__ import annotations

import sympy as sp

# The row length C: a positive integer known at run time. The leading underscore keeps it
# apart from every name a spec may declare.
ROW_SIZE = sp.Symbol("_C", positive=True, integer=True)


class _Reduction(sp.Function):
    """A value per row from an element expression; not differentiated by SymPy directly
    (the row derivation differentiates the lowered program)."""

    nargs = 1

    def _eval_is_real(self):
        return self.args[0].is_real


class rowsum(_Reduction):
    """sum_k e_k over the row."""


class rowmax(_Reduction):
    """max_k e_k; its derivative goes to the first largest element."""


class rowmin(_Reduction):
    """min_k e_k; its derivative goes to the first smallest element."""


class logsumexp(_Reduction):
    """log sum_k exp(e_k), evaluated as M + log1p(sum_{k != argmax} exp(e_k - M)), M = max_k e_k."""


class take(sp.Function):
    """take(e, y) = e_y: the element expression at class index y of the row."""

    nargs = 2

    def _eval_is_real(self):
        return self.args[0].is_real


class onehot(sp.Function):
    """onehot(y)_k = 1 if k = y else 0, for the element k of the row (y a class index)."""

    nargs = 1

    def fdiff(self, argindex=1):
        return sp.S.Zero

    def _eval_is_real(self):
        return True

    def _eval_is_nonnegative(self):
        return True


REDUCTION_CLASSES = (rowsum, rowmax, rowmin, logsumexp, take)


def _logsumexp(e):
    return logsumexp(e)


# Spec name -> (builder, arity, meaning): merged into the spec language's function table.
ROW_FUNCTIONS = {
    "sum": (rowsum, (1, 1), "sum over the row's axis"),
    "mean": (lambda e: rowsum(e) / ROW_SIZE, (1, 1), "mean over the row's axis"),
    "max": (rowmax, (1, 1), "largest element of the row (one argument; Max(a, b) is elementwise)"),
    "min": (rowmin, (1, 1), "smallest element of the row (one argument; Min(a, b) is elementwise)"),
    "logsumexp": (_logsumexp, (1, 1), "log(sum(exp(e))) over the row, without overflow"),
    "take": (take, (2, 2), "take(e, y): element y of the row, y an integer class index"),
    "onehot": (onehot, (1, 1), "onehot(y): 1 at element y of the row, 0 elsewhere"),
    "dot": (lambda a, b: rowsum(a * b), (2, 2), "dot(a, b) = sum(a*b) over the row"),
    "norm": (lambda a: sp.sqrt(rowsum(a**2)), (1, 1), "Euclidean norm sqrt(sum(a**2)) of the row"),
    "softmax": (lambda e: sp.exp(e - logsumexp(e)), (1, 1), "exp(e - logsumexp(e)), elementwise over the row"),
    "log_softmax": (lambda e: e - logsumexp(e), (1, 1), "e - logsumexp(e), elementwise over the row"),
    "size": (lambda e: ROW_SIZE, (1, 1), "size(e): the row's length C"),
}


def has_reductions(expr: sp.Expr) -> bool:
    return expr.has(*REDUCTION_CLASSES, onehot) or ROW_SIZE in expr.free_symbols

