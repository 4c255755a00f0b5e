"""Compiled loops: plain Python functions compiled by numba on first call.

numba is imported only when a compiled function is first called (importing a module that defines one
stays light, which the backend relies on), and the machine code is cached on disk next to the module
(or in the user's cache folder when that is read-only), so only the first run on a machine pays the
compile. The plain function stays reachable as ``.py_func`` for tests.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from functools import cache
from typing import Any

from groundlabel.errors import UserError


class Compiled:
    """A function compiled with ``numba.njit(cache=True, nogil=True)`` on its first call."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.py_func = fn
        self._compiled: Callable[..., Any] | None = None
        self.__doc__ = fn.__doc__
        self.__name__ = fn.__name__

    def __call__(self, *args: Any) -> Any:
        if self._compiled is None:
            try:
                import numba
            except ImportError as exc:
                raise UserError(
                    f"{self.__name__} needs numba: pip install 'groundlabel[export]' (or [worker])"
                ) from exc
            self._compiled = numba.njit(cache=True, nogil=True)(self.py_func)
        return self._compiled(*args)


def compiled(fn: Callable[..., Any]) -> Compiled:
    """Decorator: compile ``fn`` with numba when it is first called (see the module docstring)."""
    return Compiled(fn)


@cache
def numba_available() -> bool:
    """Whether numba is installed (it comes with the worker and export extras, not with the backend's base
    install), without importing it."""
    return importlib.util.find_spec("numba") is not None
