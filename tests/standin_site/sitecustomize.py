"""Put on PYTHONPATH by an end-to-end test: in every Python that DVC starts, torchvision's ImageNet weights of
every backbone are named $CXR14_STAND_IN_WEIGHTS (a small stand-in file whose SHA-256 prefix is in its name,
as torchvision's are), still at torchvision's URL; the test's server, set as weights.mirror, serves it.
torchvision.models is patched once it is imported, so Pythons that never import it (DVC itself) stay fast."""

import importlib.abc
import importlib.util
import os
import sys
from types import SimpleNamespace

NAME = os.environ["CXR14_STAND_IN_WEIGHTS"]


class _StandIn:
    """torchvision's weights of a backbone (their transforms, meta, ...) with the stand-in's URL."""

    def __init__(self, real):
        self._real = real
        self.url = f"https://download.pytorch.org/models/{NAME}"

    def __getattr__(self, name):
        return getattr(self._real, name)


class _PatchTorchvisionModels(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname != "torchvision.models":
            return None
        sys.meta_path.remove(self)  # find the real module, then patch it once it has run
        spec = importlib.util.find_spec(fullname)
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            real = module.get_model_weights
            module.get_model_weights = lambda backbone: SimpleNamespace(DEFAULT=_StandIn(real(backbone).DEFAULT))

        spec.loader.exec_module = exec_module
        return spec


sys.meta_path.insert(0, _PatchTorchvisionModels())
