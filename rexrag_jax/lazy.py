"""The package policy for `__init__` files: import nothing at package import, resolve public names on
first use (PEP 562). `import rexrag_jax.data` must not start the decode stack or jax."""

from __future__ import annotations

import importlib
from collections.abc import Callable


def lazy_exports(package: str, exports: dict[str, str]) -> tuple[Callable[[str], object], list[str]]:
    """(`__getattr__`, `__all__`) for a package whose public name `n` lives in module `exports[n]`."""

    def __getattr__(name: str) -> object:
        if name in exports:
            return getattr(importlib.import_module(exports[name]), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__, sorted(exports)
