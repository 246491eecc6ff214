"""The backends: one module per backend (and loss family), each registering itself.

``load_backends`` imports them once. A backend whose module cannot be imported here
(no triton installed, say) registers nothing; ``mpt-kernels info`` says why.
"""

from __future__ import annotations

import importlib

# backend module -> the reason it failed to import, or None when it loaded
IMPORT_ERRORS: dict = {}

_BACKEND_MODULES = ("reference", "triton", "cuda")


def load_backends() -> None:
    for name in _BACKEND_MODULES:
        if name in IMPORT_ERRORS:
            continue
        try:
            importlib.import_module(f"{__name__}.{name}")
            IMPORT_ERRORS[name] = None
        except ImportError as error:  # an optional dependency is missing
            IMPORT_ERRORS[name] = f"{type(error).__name__}: {error}"
