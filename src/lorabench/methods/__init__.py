"""The method registry: a method exists only through `@register("name")`.

The key is the YAML file name under conf/method/ and `cfg.method.name`. Every module of this package is
imported on `import lorabench.methods`, so a new method is one file with one `@register` line; its options are
a `MethodOptions` dataclass in that file (its defaults are the method's; the YAML documents them).
"""

from __future__ import annotations

from typing import Any, Callable

from ..budget import Budget
from ..errors import ConfigError
from .base import AdapterMethod, LowRankLinear, MethodOptions, TargetInfo

_REGISTRY: dict[str, type[AdapterMethod]] = {}


def register(name: str) -> Callable[[type[AdapterMethod]], type[AdapterMethod]]:
    def deco(cls: type[AdapterMethod]) -> type[AdapterMethod]:
        if name in _REGISTRY:
            raise ValueError(f"method {name!r} registered twice")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco


def names() -> list[str]:
    return sorted(_REGISTRY)


def get(name: str) -> type[AdapterMethod]:
    if name not in _REGISTRY:
        from ..validate import did_you_mean

        raise ConfigError(f"unknown method {name!r}{did_you_mean(str(name), names())}; known methods: "
                          f"{', '.join(names())} (e.g. method=lora)")
    return _REGISTRY[name]


def check_options(config: dict[str, Any]) -> MethodOptions:
    """The `method` config group checked against its method's typed options before any work starts (unknown
    keys, types, ranges: one ConfigError); values that only differ in form ("8", "true") are converted in
    `config` itself, so the run records what it used."""
    cls = get(config["name"])
    options = cls.Options.from_dict(cls.name, config)
    for key in config:
        if key != "name":
            config[key] = getattr(options, key)
    return options


def build(config: dict[str, Any], budget: Budget) -> AdapterMethod:
    """Instantiate the method named by `config['name']` with the rest of its config."""
    return get(config["name"])(config, budget)


def _import_all() -> None:
    import importlib
    import pkgutil

    for info in pkgutil.iter_modules(__path__):
        if info.name not in ("base",):
            importlib.import_module(f"{__name__}.{info.name}")


_import_all()

__all__ = ["AdapterMethod", "LowRankLinear", "MethodOptions", "TargetInfo", "register", "names", "get", "check_options",
           "build"]
