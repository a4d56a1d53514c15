"""Benchmark sections, one module each. A module registers itself with
``@bench.harness.section(name, description)``; :func:`load_all` imports every module here."""

from __future__ import annotations

import importlib
import pkgutil


def load_all() -> None:
    for mod in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{mod.name}")
