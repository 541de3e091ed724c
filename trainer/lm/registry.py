"""Registries of named variants of the math (RL's advantages, aggregations and policy losses; the preference
losses): a name chosen in the config looks up a pure function, and a variant gets a new name, never a branch inside
a trainer."""

from __future__ import annotations

import numbers
from typing import Callable


def registrar(registry: dict[str, Callable], kind: str, doc: str):
    """A decorator factory `register(name)` that adds a function to `registry` under `name`, refusing a name
    that is taken (a second function there would silently change every run that asks for it); `doc` is its
    docstring, saying what a registered function computes."""
    def register(name: str):
        if not isinstance(name, str) or not name:
            raise ValueError(f"a {kind} is registered under a non-empty name, got {name!r}")

        def add(fn: Callable) -> Callable:
            if name in registry:
                taken = registry[name]
                raise ValueError(f"{kind} {name!r} is taken (by {taken.__module__}.{taken.__qualname__}); register "
                                 f"{fn.__qualname__} under a new name")
            registry[name] = fn
            return fn
        return add
    register.__doc__ = doc
    return register


def lookup(registry: dict[str, Callable], name: str, argument: str) -> Callable:
    """`registry[name]`, or a ValueError naming the argument and the choices."""
    if name not in registry:
        raise ValueError(f"unknown {argument} {name!r}; choose one of {sorted(registry)}")
    return registry[name]


def is_int(value) -> bool:
    """An integer argument (a bool is not one here, whatever Python says)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_real(value) -> bool:
    """A real-number argument (not a bool)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)
