"""Module attributes that import their module on first use (PEP 562)."""
from importlib import import_module


def lazy_attributes(package: str, where: dict[str, str], namespace: dict):
    """A module `__getattr__` that loads `name` from submodule `where[name]` of `package` and caches it."""
    def __getattr__(name: str):
        if name not in where:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(import_module(f".{where[name]}", package), name)
        namespace[name] = value
        return value
    return __getattr__
