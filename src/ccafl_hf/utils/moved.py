"""The old import paths of the modules that moved to `ccafl_hf.utils` and `ccafl_hf.pipeline`."""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

#: modules that moved in 0.3 → their home; the old import paths keep working for one release
MOVED_MODULES = {
    "ccafl_hf.cache": "ccafl_hf.utils.cache",
    "ccafl_hf.hub_utils": "ccafl_hf.utils.hub_utils",
    "ccafl_hf.model_files": "ccafl_hf.utils.model_files",
    "ccafl_hf.neighbors": "ccafl_hf.utils.neighbors",
    "ccafl_hf.precision": "ccafl_hf.utils.precision",
    "ccafl_hf.model_card": "ccafl_hf.pipeline.model_card",
}


class _MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """``import ccafl_hf.precision`` gives the module object of ``ccafl_hf.utils.precision`` (the same one, so
    attributes set on either name are seen through both)."""

    def find_spec(self, name, path=None, target=None):
        return importlib.util.spec_from_loader(name, self) if name in MOVED_MODULES else None

    def create_module(self, spec):
        return importlib.import_module(MOVED_MODULES[spec.name])

    def exec_module(self, module):
        sys.modules[module.__spec__.name if module.__spec__ else module.__name__] = module


def install_moved_modules() -> None:
    """Make the `MOVED_MODULES` old names importable (once per process)."""
    if not any(isinstance(finder, _MovedModules) for finder in sys.meta_path):
        sys.meta_path.append(_MovedModules())


__all__ = ["MOVED_MODULES", "install_moved_modules"]
