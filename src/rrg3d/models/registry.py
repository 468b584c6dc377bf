"""Architectures are data: components are registered by name and built from plain mappings (YAML).

Every registered class declares a ``Config`` dataclass; :meth:`Registry.build` validates a mapping against it
(unknown keys are an error that lists the known ones) and calls ``cls(config, **context)``. The resolved config
is kept on the module as ``module.config`` so checkpoints can write it back out exactly::

    ENCODERS = Registry("encoder")

    @ENCODERS.register("vit3d")
    class ViT3D(nn.Module):
        @dataclass
        class Config:
            dim: int = 768
        def __init__(self, config: Config) -> None: ...

    encoder = ENCODERS.build({"name": "vit3d", "dim": 64})
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from rrg3d.errors import ConfigError

T = TypeVar("T")


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Lists from YAML become the tuples the dataclasses declare; everything else is checked lightly."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], where) if len(args) == 1 else value
    if origin is tuple and isinstance(value, (list, tuple)):
        args = typing.get_args(annotation)
        if args and args[-1] is not Ellipsis and len(args) != len(value):
            raise ConfigError(f"{where}: expected {len(args)} values, got {len(value)}")
        return tuple(value)
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation is int and isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def config_from_mapping(config_cls: type[T], data: Mapping[str, Any], where: str) -> T:
    """Build a config dataclass from a mapping, with a clear error on unknown or malformed keys."""
    fields = {f.name: f for f in dataclasses.fields(config_cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown keys {unknown}; known keys: {sorted(fields)}")
    hints = typing.get_type_hints(config_cls)
    values = {k: _coerce(v, hints.get(k, Any), f"{where}.{k}") for k, v in data.items()}
    try:
        return config_cls(**values)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {exc}") from exc


def plain_data(value: Any) -> Any:
    """Nested tuples, lists and dicts as YAML-safe lists and dicts (tuples become lists)."""
    if isinstance(value, (list, tuple)):
        return [plain_data(v) for v in value]
    if isinstance(value, dict):
        return {k: plain_data(v) for k, v in value.items()}
    return value


def config_to_dict(config: Any) -> dict[str, Any]:
    """A config dataclass as plain YAML-safe data (tuples become lists)."""
    return {k: plain_data(v) for k, v in dataclasses.asdict(config).items()}


class Registry:
    """Name → class, for one kind of component (encoder, compressor, projector, ...)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._classes: dict[str, type] = {}

    def register(self, name: str) -> Callable[[type[T]], type[T]]:
        def decorator(cls: type[T]) -> type[T]:
            if name in self._classes:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            if not dataclasses.is_dataclass(getattr(cls, "Config", None)):
                raise TypeError(f"{cls.__name__} needs a nested dataclass named Config")
            self._classes[name] = cls
            return cls

        return decorator

    def names(self) -> list[str]:
        return sorted(self._classes)

    def get(self, name: str) -> type:
        try:
            return self._classes[name]
        except KeyError:
            raise ConfigError(f"unknown {self.kind} {name!r}; known: {', '.join(self.names())}") from None

    def make_config(self, data: Mapping[str, Any]) -> tuple[str, Any]:
        """``(name, Config)`` from a mapping holding ``name`` plus the class's config keys."""
        if not isinstance(data, Mapping) or "name" not in data:
            raise ConfigError(f"{self.kind} config must be a mapping with a 'name' key, got {data!r}")
        values = dict(data)
        name = str(values.pop("name"))
        cls = self.get(name)
        return name, config_from_mapping(cls.Config, values, where=f"{self.kind} {name!r}")

    def build(self, data: Mapping[str, Any], **context: Any) -> Any:
        """Instantiate from ``{"name": ..., **config}``; ``context`` passes sizes known only at build time."""
        name, config = self.make_config(data)
        module = self._classes[name](config, **context)
        module.config = config
        module.registry_name = name
        return module

    def describe(self, module: Any) -> dict[str, Any]:
        """The mapping that rebuilds ``module`` (inverse of :meth:`build`)."""
        return {"name": module.registry_name, **config_to_dict(module.config)}


# One registry per kind of component. The modules that define components register into these on import;
# ``rrg3d.models`` imports them all, so ``rrg3d.models.ENCODERS.names()`` is complete.
ENCODERS = Registry("encoder")
COMPRESSORS = Registry("compressor")
PROJECTORS = Registry("projector")
