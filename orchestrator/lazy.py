"""Modules loaded on first use, so that building the ``fastpath`` parser (which imports every
command module) does not pay for libraries only some commands need.

``from orchestrator.lazy import numpy as np`` gives an object that imports numpy at the first
attribute access (``np.unique``) and then behaves as the module. Keep such names out of
module-level expressions (pass dtypes as strings: ``dtype="V32"``), or the import happens at
once. ``tests/test_lazy_imports.py`` checks which modules stay unloaded.
"""

from __future__ import annotations

import importlib
from typing import Any


class LazyModule:
    """A stand-in for module ``name`` that imports it on first attribute access."""

    def __init__(self, name: str):
        object.__setattr__(self, "_lazy_name", name)

    def __getattr__(self, attr: str) -> Any:
        # Only called for names not yet in our __dict__: load once, then copy the module's
        # namespace so later lookups are plain attribute reads (hot paths use np.* per call).
        module = importlib.import_module(self._lazy_name)
        self.__dict__.update(module.__dict__)
        return getattr(module, attr)

    def __repr__(self) -> str:
        return f"<lazy module {self._lazy_name!r}>"


numpy = LazyModule("numpy")
zstandard = LazyModule("zstandard")
aead = LazyModule("cryptography.hazmat.primitives.ciphers.aead")  # .AESGCM
crypto_exceptions = LazyModule("cryptography.exceptions")  # .InvalidTag
scrypt = LazyModule("cryptography.hazmat.primitives.kdf.scrypt")  # .Scrypt
speedups = LazyModule("agent.speedups")  # the compiled extension or its pure-Python twin
