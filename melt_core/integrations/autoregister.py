"""``import melt_core`` registers melt's models with transformers, without importing transformers.

``hf`` (which registers itself when imported) needs transformers' modeling and generation machinery,
seconds to import: paid at ``import melt_core``, it made every ``melt`` command slow to start. So
``install()`` imports ``hf`` at once only when transformers' auto classes are already imported, and
otherwise as soon as they are: a ``sys.meta_path`` finder watches the imports of transformers'
modules and imports ``hf`` when ``AutoConfig``'s module has been imported and no transformers module
is still half-imported (``hf`` imports several of them). ``AutoConfig`` / ``AutoModelForCausalLM``
then know ``ouro`` and ``melt`` before they can be used, as if ``hf`` had been imported up front.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
from collections.abc import Sequence
from types import ModuleType
from typing import Any

AUTO_CONFIG_MODULE = "transformers.models.auto.configuration_auto"  # AutoModelForCausalLM's module imports it


def _is_transformers(name: str) -> bool:
    return name == "transformers" or name.startswith("transformers.")


def _half_imported_transformers(done: str) -> bool:
    """Whether a transformers module other than ``done`` is still being imported."""
    return any(
        _is_transformers(name) and name != done and getattr(getattr(m, "__spec__", None), "_initializing", False)
        for name, m in list(sys.modules.items())
    )


class _Loader(importlib.abc.Loader):
    """A transformers module's own loader, telling the finder when the module has been imported."""

    def __init__(self, finder: _Finder, loader: Any) -> None:
        self.finder, self.loader = finder, loader

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self.loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self.finder.depth += 1
        try:
            self.loader.exec_module(module)
        finally:
            self.finder.depth -= 1
            if module.__spec__ is not None and module.__spec__.loader is self:
                module.__spec__.loader = self.loader  # the module keeps its real loader
            if getattr(module, "__loader__", None) is self:
                module.__loader__ = self.loader
        self.finder.imported(module.__name__)

    def __getattr__(self, name: str) -> Any:  # get_source, get_resource_reader, is_package, ...
        if "loader" not in self.__dict__:
            raise AttributeError(name)
        return getattr(self.loader, name)


class _Finder(importlib.abc.MetaPathFinder):
    """Finds nothing itself: wraps the loader of every transformers module the other finders find."""

    def __init__(self) -> None:
        self.depth = 0  # transformers modules being imported through this finder

    def find_spec(
        self, name: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if not _is_transformers(name):
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _Loader(self, spec.loader)
                return spec
        return None

    def imported(self, name: str) -> None:
        """Module ``name`` has been imported: import ``hf`` if transformers' auto classes are now ready."""
        if _finder is not self or self.depth or AUTO_CONFIG_MODULE not in sys.modules:
            return
        if _half_imported_transformers(name):
            return
        _uninstall()
        from . import hf  # noqa: F401  (registers itself)


_finder: _Finder | None = None


def _uninstall() -> None:
    global _finder
    if _finder is not None and _finder in sys.meta_path:
        sys.meta_path.remove(_finder)
    _finder = None


def install() -> None:
    """Register melt's models with transformers now if its auto classes are imported, else when they are."""
    global _finder
    if "melt_core.integrations.hf" in sys.modules or _finder is not None:
        return
    if AUTO_CONFIG_MODULE in sys.modules:
        from . import hf  # noqa: F401  (registers itself)

        return
    _finder = _Finder()
    sys.meta_path.insert(0, _finder)
