"""Known gaps of the row-wise kernels: regions where a kernel does not meet the verification's
relative-error bound, each with the reason, as predicates ``gap(output, point, entry)`` over a
verification point (see :func:`lossgen.verify_rows.check_size`). `lossgen verify` and the tests
report values inside a gap apart ('<output> known gap'); the tests fail once a gap closes.
README, Verification, describes each."""
from __future__ import annotations

# Row-wise losses: name -> (predicate, why) where a kernel does not meet the bound. Empty since
# global SSIM's full Hessian took its cancelling entries again in double-word
# (lossgen/double_word.py); the elementwise table, tests/test_catalog.py's KNOWN_GAPS, is empty too.
ROW_KNOWN_GAPS: dict = {}


def gap_of(name: str):
    """The known-gap predicate of the row-wise loss ``name``, or None."""
    return ROW_KNOWN_GAPS[name][0] if name in ROW_KNOWN_GAPS else None
