"""A stand-in for ``torchvision`` so SGLang's scheduler modules import on a CPU-only venv.

PyPI's torchvision wheels require a CUDA build of torch (and ~19 NVIDIA packages),
which must never enter the engine test venvs. SGLang imports torchvision at module
level in multimodal helpers that the scheduler path never calls, so any object will
do: every ``torchvision.*`` module is an empty module whose attributes are inert
classes (callable, subclassable, attribute-accessible). ``install()`` must run after
transformers has recorded torchvision as unavailable, so transformers never tries to
use it.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import types


class _Inert(type):
    def __getattr__(cls, name: str) -> type:
        if name.startswith("__"):
            raise AttributeError(name)
        return _inert(name)

    def __getitem__(cls, item: object) -> type:
        return cls


def _inert(name: str) -> type:
    return _Inert(
        name,
        (),
        {
            "__init__": lambda self, *a, **k: None,
            "__call__": lambda self, *a, **k: self,
            "__getattr__": lambda self, n: _inert(n),
        },
    )


def _module_getattr(name: str) -> type:
    if name.startswith("__"):
        raise AttributeError(name)
    return _inert(name)


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path=None, target=None):  # noqa: ANN001
        if fullname == "torchvision" or fullname.startswith("torchvision."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):  # noqa: ANN001
        module = types.ModuleType(spec.name)
        module.__path__ = []
        module.__getattr__ = _module_getattr
        if spec.name == "torchvision":
            module.__version__ = "0.0.0+standin"
        return module

    def exec_module(self, module) -> None:  # noqa: ANN001
        return None


def install() -> None:
    import transformers.utils.import_utils  # noqa: F401  (records torchvision as missing first)

    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
