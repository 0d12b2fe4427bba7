"""Package exports resolved on first use (PEP 562), for the packages whose ``__init__`` must
stay cheap to import (no FAISS, torch or gRPC until a name that needs them is used)."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def lazy_exports(package: str, exports: Mapping[str, str]) -> Callable[[str], Any]:
    """The module ``__getattr__`` of ``package``: each name of ``exports`` comes from the module
    it maps to (``"pkg.mod"``, or ``"pkg.mod:attr"`` where the attribute has another name)."""

    def __getattr__(name: str) -> Any:
        target = exports.get(name)
        if target is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        module, _, attr = target.partition(":")
        return getattr(importlib.import_module(module), attr or name)

    return __getattr__
