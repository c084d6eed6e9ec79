"""Let diffusers' pipelines save and load an SMD-wrapped model.

``DiffusionPipeline.save_pretrained`` saves a component only if its class derives from one
listed in diffusers' ``LOADABLE_CLASSES``; anything else is skipped with a warning, so a
pipeline holding an ``SMD`` UNet would be written without its UNet. Listing ``softmix.SMD``
there (with its own ``save_pretrained`` / ``from_pretrained``) makes ``pipe.save_pretrained(dir)``
write the UNet as an SMD checkpoint, and ``DDPMPipeline.from_pretrained(dir)`` rebuild it
(``model_index.json`` names ``["softmix", "SMD"]``; diffusers imports no library just because
a saved pipeline names it, so ``import softmix`` before loading).
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from types import ModuleType

_LOADING_UTILS = "diffusers.pipelines.pipeline_loading_utils"
_METHODS = ["save_pretrained", "from_pretrained"]


def _add_smd(loading: ModuleType) -> None:
    loading.LOADABLE_CLASSES.setdefault("softmix", {})["SMD"] = list(_METHODS)
    loading.ALL_IMPORTABLE_CLASSES["SMD"] = list(_METHODS)


class _AddSMDOnImport(importlib.abc.MetaPathFinder):
    """Adds SMD to diffusers' tables right after diffusers loads them, so that importing
    softmix never imports diffusers (seconds) just in case."""

    def find_spec(self, name, path, target=None):
        if name != _LOADING_UTILS:
            return None
        sys.meta_path.remove(self)  # once, and not to find ourselves below
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_add(module: ModuleType) -> None:
            exec_module(module)
            _add_smd(module)

        spec.loader.exec_module = exec_then_add
        return spec


def register_with_diffusers() -> None:
    """Add ``softmix.SMD`` to diffusers' loadable classes: now if diffusers' pipeline loader is
    already imported, else when it is (``import softmix`` calls this)."""
    loading = sys.modules.get(_LOADING_UTILS)
    if loading is not None:
        _add_smd(loading)
    elif not any(isinstance(f, _AddSMDOnImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _AddSMDOnImport())
