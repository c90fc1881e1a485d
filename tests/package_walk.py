"""Finding a package's plugin classes by importing every module of it (pkgutil), not through ``__subclasses__()``,
which sees only the modules something already imported: a module missing from ``__init__`` would be invisible."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from types import ModuleType


def package_modules(package: ModuleType) -> list[ModuleType]:
    """The package and every module and subpackage under it, imported."""
    names = [info.name for info in pkgutil.walk_packages(package.__path__, f"{package.__name__}.")]
    return [package, *(importlib.import_module(name) for name in names)]


def concrete_classes_defined_in(package: ModuleType, base: type) -> list[type]:
    """The public, non-abstract subclasses of ``base`` defined (not just imported) in any module of ``package``."""
    found = {
        obj
        for module in package_modules(package)
        for name, obj in vars(module).items()
        if isinstance(obj, type)
        and issubclass(obj, base)
        and obj is not base
        and obj.__module__ == module.__name__
        and not name.startswith("_")
        and not inspect.isabstract(obj)
    }
    return sorted(found, key=lambda cls: cls.__name__)
