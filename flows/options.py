"""Values of command-line options that take one number or one per axis (``256``,
``64,256,256``, ``2x0.325x0.325``), shared by the commands."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

__all__ = ["numbers"]

N = TypeVar("N", int, float)


def numbers(text: str, kind: Callable[[str], N], problem: Callable[[], Exception]) -> N | list[N]:
    """``text`` as one number, or a list of them (separated by ``,`` or ``x``).

    Raises
    ------
    Exception
        ``problem()``, for a part that is not a ``kind``.
    """
    try:
        parts = [kind(p) for p in text.replace("x", ",").split(",") if p.strip()]
    except ValueError as err:
        raise problem() from err
    return parts[0] if len(parts) == 1 else parts
