"""Find a strategy by registry name, ``"package.module:ClassName"``, ``"path/to/file.py:ClassName"``
(relative to the working directory), or the entry-point group ``fedpeft.strategies``."""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import sys
from collections.abc import Callable
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

from fedpeft.errors import UserError
from strategies.base import Strategy

ENTRY_POINT_GROUP = "fedpeft.strategies"

_REGISTRY: dict[str, Callable[..., Strategy]] = {}


class StrategyError(UserError):
    """A strategy that cannot be found, built or given these options."""


def register_strategy(name: str) -> Callable[[type], type]:
    """Class decorator: make a strategy selectable by ``name``."""

    def decorate(cls: type) -> type:
        if name in _REGISTRY:
            raise ValueError(f"strategy name {name!r} is already registered")
        _REGISTRY[name] = cls
        return cls

    return decorate


def available_strategies() -> list[str]:
    """Registered names plus those published under the ``fedpeft.strategies`` entry point."""
    return sorted(set(_REGISTRY) | {ep.name for ep in entry_points(group=ENTRY_POINT_GROUP)})


def create_strategy(
    spec: str, options: dict[str, Any] | None = None, context: dict[str, Any] | None = None
) -> Strategy:
    """Instantiate the strategy ``spec`` with keyword ``options``; errors name the fix.

    ``context`` holds facts about the run (``clients_per_round``, ``num_clients``), passed to a
    strategy whose constructor takes them when the options do not set them.
    """
    factory = _resolve(spec)
    options = dict(options or {})
    _check_options(spec, factory, options)
    params = _parameters(factory)
    for key, value in (context or {}).items():
        if key in params and key not in options:
            options[key] = value
    missing = [n for n, p in params.items() if p.default is inspect.Parameter.empty and n not in options]
    if missing:
        raise StrategyError(f"strategy {spec!r} needs the option(s) {', '.join(missing)} in [strategy]")
    if inspect.isclass(factory) and (not issubclass(factory, Strategy) or inspect.isabstract(factory)):
        raise StrategyError(_not_a_strategy(spec))
    try:
        strategy = factory(**options)
    except (TypeError, ValueError) as exc:
        if isinstance(exc, StrategyError):
            raise
        raise StrategyError(f"strategy {spec!r} rejected its options: {exc}") from exc
    if not isinstance(strategy, Strategy):
        raise StrategyError(_not_a_strategy(spec))
    check_signatures(spec, type(strategy))
    return strategy


def check_signatures(spec: str, cls: type) -> None:
    """Refuse, before any client trains, a strategy whose override of a ``Strategy`` method takes
    other required positional parameters than the base method, or declares that it returns
    something else than the value type the base returns (``GlobalState``, ``ClientPlan``)."""
    for name, base in inspect.getmembers(Strategy, inspect.isfunction):
        if name.startswith("_") or getattr(cls, name, base) is base:
            continue
        expected, got = inspect.signature(base), inspect.signature(getattr(cls, name))
        if _positional(got) != _positional(expected) or not _same_return(got, expected):
            raise StrategyError(
                f"strategy {spec!r}: {name}{got} does not match Strategy.{name}{expected}; "
                "fix its parameters (docs/writing-a-strategy.md)"
            )


def _positional(signature: inspect.Signature) -> list[str]:
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return [p.name for p in signature.parameters.values() if p.kind in kinds and p.default is p.empty]


VALUE_TYPES = ("GlobalState", "ClientPlan")  # return types an override must keep, when it declares one


def _same_return(got: inspect.Signature, expected: inspect.Signature) -> bool:
    """An override returning one of the value types declares that type, or nothing (annotations
    are compared as text: ``from __future__ import annotations`` leaves them strings)."""
    text = lambda a: a if isinstance(a, str) else getattr(a, "__name__", str(a))  # noqa: E731
    wanted = text(expected.return_annotation)
    if wanted not in VALUE_TYPES or got.return_annotation is inspect.Signature.empty:
        return True
    return wanted in text(got.return_annotation)


def _not_a_strategy(spec: str) -> str:
    return (
        f"strategy {spec!r} does not implement the Strategy protocol: subclass strategies.Strategy and "
        "implement aggregate(self, rnd, state, updates) (docs/strategies.md, 'Writing your own')"
    )


def _resolve(spec: str) -> Callable[..., Strategy]:
    if spec in _REGISTRY:
        return _REGISTRY[spec]
    if ":" in spec:
        module_name, _, attr = spec.rpartition(":")
        try:
            return getattr(_import(module_name), attr)
        except (ImportError, AttributeError, OSError) as exc:
            raise StrategyError(
                f"cannot load strategy {spec!r} ({exc}); check the module is importable "
                "and the class name is right"
            ) from exc
    for ep in entry_points(group=ENTRY_POINT_GROUP, name=spec):
        return ep.load()
    if spec.endswith(".py"):
        raise StrategyError(f"strategy {spec!r} is a file: name its class too, e.g. '{spec}:MyStrategy'")
    raise StrategyError(
        f"unknown strategy {spec!r}; choose one of {', '.join(available_strategies())} "
        "or give 'package.module:ClassName'"
    )


def _parameters(factory: Callable[..., Any]) -> dict[str, inspect.Parameter]:
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return {}
    return {n: p for n, p in params.items() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}


def _import(module_name: str) -> Any:
    """A module by dotted name, or from a ``.py`` file path."""
    if not module_name.endswith(".py"):
        return importlib.import_module(module_name)
    path = Path(module_name).resolve()
    name = f"fedpeft_user_strategy_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None or not path.is_file():
        raise ImportError(f"no Python file at {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _check_options(spec: str, factory: Callable[..., Any], options: dict[str, Any]) -> None:
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    unknown = sorted(set(options) - set(params))
    if unknown:
        valid = ", ".join(params) or "none"
        raise StrategyError(
            f"strategy {spec!r} has no option {', '.join(map(repr, unknown))}; valid options: {valid}"
        )
