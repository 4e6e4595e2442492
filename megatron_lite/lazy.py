"""Package names that load their module on first use (PEP 562), so that registering a command's
sub-parser (`megatron-lite --help`) imports neither torch nor the rest of the package."""

from __future__ import annotations

import importlib
from typing import Any, Callable


def lazy_names(package: str, where: dict[str, str]) -> Callable[[str], Any]:
    """A module `__getattr__` for `package`: each name of `where` is imported from its submodule
    (`where[name]`, relative to the package) the first time it is read."""
    def __getattr__(name: str) -> Any:
        if name not in where:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(f".{where[name]}", package), name)
    return __getattr__
