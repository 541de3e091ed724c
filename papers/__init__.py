"""Reproduced papers: one folder each, holding its trainer subclass, config.yaml and README.

A paper package defines `Config` (a `TrainerConfig` subclass with the paper's own keys) and
`run(config) -> Path` (runs the reproduction, returns the folder with its results); its docstring's
first line describes it in `paperloop list`. What several papers share lives beside them: `stages.py` (a stage
trained in its own folder, or loaded when it was finished with the same settings: rlvr, retool).
"""

from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType

HERE = Path(__file__).parent


def available() -> list[str]:
    return sorted(p.parent.name for p in HERE.glob("*/config.yaml"))


def load(name: str) -> ModuleType:
    if name not in available():
        raise KeyError(f"unknown paper {name!r}; available: {', '.join(available())}")
    return importlib.import_module(f"{__name__}.{name}")


def config_path(name: str) -> Path:
    return HERE / name / "config.yaml"
