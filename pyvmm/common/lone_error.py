"""A nursery's single failure raised as itself, whatever trio's exception-group mode.

trio 0.25 and later wrap every exception that leaves a nursery in an ExceptionGroup, even a lone
one.  Callers of pyvmm catch what it raises by type (VmmError, PolicyUnavailable): wrapped, a clear
one-line error becomes a traceback.  Where one task is the only one that can fail, unwrap it here.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


def _leaves(group: BaseExceptionGroup) -> list[BaseException]:
    out: list[BaseException] = []
    for e in group.exceptions:
        out.extend(_leaves(e) if isinstance(e, BaseExceptionGroup) else [e])
    return out


@contextmanager
def lone_error() -> Iterator[None]:
    """Re-raise an exception group that holds one exception as that exception; more stay a group."""
    try:
        yield
    except BaseExceptionGroup as group:
        leaves = _leaves(group)
        if len(leaves) != 1:
            raise
        raise leaves[0] from None
