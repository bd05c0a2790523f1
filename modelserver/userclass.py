"""Naming a model class (or factory) as data, and turning that data back into the class.

A model spec names its class by import path (``"package.module:Qualname"``). That is
enough for classes in installed packages, but not for a class defined in the user's own
script (``__main__``) or in a module beside it, which the model server - a different
process, perhaps started by another job - cannot import. For those, ``describe`` also
ships the class *by value*, as source text: the class's own source plus what it needs
from its module (imports, helper functions and classes, plain constants), found by
walking the names the source refers to. ``resolve`` executes that source in a fresh
module named after its hash, so two jobs' ``model.py`` never collide.

This is code, not pickle: it is readable, and it only runs in a server that accepted the
connection from the same user (SO_PEERCRED). A global the bundler cannot express as
source (an arbitrary object) makes ``describe`` fall back to the import path alone.
"""

from __future__ import annotations

import ast
import builtins
import hashlib
import importlib
import inspect
import logging
import os
import sys
import sysconfig
import textwrap
import types
from typing import Any

log = logging.getLogger("beamlet.userclass")

_CONSTANT_TYPES = (type(None), bool, int, float, complex, str, bytes)
_INSTALLED_ROOTS = tuple(
    os.path.realpath(p)
    for p in {sysconfig.get_paths()[k] for k in ("stdlib", "platstdlib", "purelib", "platlib")}
)


class ShipError(TypeError):
    """The object cannot be described as source the server could run."""


def describe(obj: Any) -> dict[str, Any]:
    """A class or factory as data: ``{"name": "mod:Qual", "source": str | None}``."""
    module_name = getattr(obj, "__module__", None)
    qualname = getattr(obj, "__qualname__", None)
    if not module_name or not qualname:
        raise ShipError(f"{obj!r} has no module and qualified name to refer to it by")
    if "<locals>" in qualname:
        raise ShipError(
            f"{module_name}.{qualname} is defined inside a function; define the model "
            "class at the top level of a module so the model server can load it"
        )
    ref: dict[str, Any] = {"name": f"{module_name}:{qualname}", "source": None}
    if _importable_anywhere(module_name):
        return ref
    try:
        ref["source"] = _Bundler(sys.modules[module_name]).bundle(obj)
    except (ShipError, OSError, TypeError) as exc:
        if module_name == "__main__":
            raise ShipError(f"cannot ship {qualname} from the main script: {exc}") from None
        log.warning("shipping %s by name only: %s", ref["name"], exc)
    return ref


def resolve(ref: dict[str, Any]) -> Any:
    """The class or factory a ``describe`` result names. Raises ImportError/AttributeError."""
    name = ref.get("name")
    if not isinstance(name, str) or ":" not in name:
        raise ImportError(f"model class must be named 'module:Qualname', got {name!r}")
    module_name, qualname = name.split(":", 1)
    source = ref.get("source")
    if source:
        module = _exec_shipped(str(source), module_name)
    else:
        module = importlib.import_module(module_name)
    obj: Any = module
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def _importable_anywhere(module_name: str) -> bool:
    """True when the module comes from the stdlib or an installed package, so any Python
    process with the same environment can import it by name."""
    if module_name == "__main__":
        return False
    module = sys.modules.get(module_name)
    path = getattr(module, "__file__", None)
    if path is None:
        return module is not None  # builtin or namespace module
    real = os.path.realpath(path)
    return any(real.startswith(root + os.sep) for root in _INSTALLED_ROOTS)


def _exec_shipped(source: str, origin: str) -> types.ModuleType:
    digest = hashlib.sha256(source.encode()).hexdigest()[:16]
    name = f"beamlet_shipped_{digest}"
    module = sys.modules.get(name)
    if module is not None:
        return module
    module = types.ModuleType(name, f"shipped by value from {origin}")
    module.__file__ = f"<shipped from {origin}>"
    sys.modules[name] = module  # dataclasses and typing look the module up while it runs
    try:
        exec(compile(source, module.__file__, "exec"), module.__dict__)
    except BaseException:
        del sys.modules[name]
        raise
    return module


class _Bundler:
    """Collects the source an object needs, dependencies first."""

    def __init__(self, module: types.ModuleType) -> None:
        self.module = module
        self.imports: dict[str, str] = {}
        self.constants: dict[str, str] = {}
        self.defs: dict[str, str] = {}
        self.visiting: set[str] = set()

    def bundle(self, obj: Any) -> str:
        self._add_definition(obj.__qualname__.split(".")[0], self._top_level(obj))
        parts = [*self.imports.values(), *self.constants.values(), *self.defs.values()]
        return "\n".join(parts) + "\n"

    def _top_level(self, obj: Any) -> Any:
        return getattr(self.module, obj.__qualname__.split(".")[0])

    def _add_definition(self, name: str, obj: Any) -> None:
        if name in self.defs or name in self.visiting:
            return
        self.visiting.add(name)
        source = textwrap.dedent(inspect.getsource(obj))
        for used in sorted(_names_used(source)):
            if used != name:
                self._add_global(used)
        self.visiting.discard(name)
        self.defs[name] = source

    def _add_global(self, name: str) -> None:
        namespace = vars(self.module)
        if name not in namespace:
            return  # a builtin, a local, an attribute name or an undefined name
        if name in vars(builtins) and namespace[name] is vars(builtins)[name]:
            return
        value = namespace[name]
        if isinstance(value, types.ModuleType):
            self.imports[name] = _import_module_line(name, value.__name__)
        elif _is_constant(value):
            self.constants[name] = f"{name} = {value!r}"
        elif isinstance(value, (type, types.FunctionType)) and value.__module__ == self.module.__name__:
            self._add_definition(name, value)
        elif (
            isinstance(value, (type, types.FunctionType, types.BuiltinFunctionType))
            or callable(value)
            and hasattr(value, "__qualname__")
        ):
            self._add_foreign(name, value)
        else:
            raise ShipError(
                f"global {name!r} ({type(value).__name__}) cannot be shipped as source; "
                "move the model class into an installed module or compute it in __init__"
            )

    def _add_foreign(self, name: str, value: Any) -> None:
        owner = value.__module__
        if owner and not _importable_anywhere(owner) and owner in sys.modules:
            bundler = _Bundler(sys.modules[owner])
            bundler.visiting = self.visiting
            bundler._add_definition(value.__qualname__.split(".")[0], bundler._top_level(value))
            self.imports.update(bundler.imports)
            self.constants.update(bundler.constants)
            self.defs.update(bundler.defs)
            if value.__name__ != name:
                self.constants[name] = f"{name} = {value.__qualname__}"
            return
        qual = value.__qualname__
        if "." in qual or "<" in qual:
            raise ShipError(f"global {name!r} refers to {owner}.{qual}, which has no import path")
        self.imports[name] = f"from {owner} import {qual} as {name}"


def _import_module_line(alias: str, module_name: str) -> str:
    if alias == module_name:
        return f"import {module_name}"
    return f"import {module_name} as {alias}"


def _is_constant(value: Any) -> bool:
    if isinstance(value, _CONSTANT_TYPES):
        return True
    if isinstance(value, (tuple, list, frozenset)):
        return all(_is_constant(v) for v in value)
    if isinstance(value, dict):
        return all(_is_constant(k) and _is_constant(v) for k, v in value.items())
    return False


def _names_used(source: str) -> set[str]:
    """Every bare name the source reads (an over-approximation: locals are included and
    later ignored because the module namespace does not hold them)."""
    tree = ast.parse(source)
    return {node.id for node in ast.walk(tree) if isinstance(node, ast.Name)}
