"""Makes bitsandbytes behave, at import, as on a CPU with AVX512-BF16 (an AMD EPYC Genoa, a Xeon
Sapphire Rapids): with this folder on PYTHONPATH, bitsandbytes' CPU backend believes the CPU has
AVX512-BF16, tries to fetch its kernels-community gemm kernel (not installed: the `kernels`
package is absent, and nothing may be downloaded) and logs that it failed, exactly the line such
a machine prints. Only the detection is replaced (bitsandbytes.functional.has_avx512bf16): the
import, the attempt and the logging are bitsandbytes' own. Used by tests/test_new_user.py."""

import importlib.abc
import importlib.machinery
import sys

TARGET = "bitsandbytes.backends.cpu.ops"


class _Loader(importlib.abc.Loader):
    def __init__(self, loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        sys.modules["bitsandbytes.functional"].has_avx512bf16 = lambda: True
        self._loader.exec_module(module)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != TARGET:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is not None:
            spec.loader = _Loader(spec.loader)
        return spec


sys.meta_path.insert(0, _Finder())
