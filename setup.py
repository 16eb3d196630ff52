"""Builds the package and the C++ CPU kernels in csrc/.

The kernels are compiled once per CPU capability into separate libraries
(dpo_kernels/_C_avx512, _C_avx2, _C_default); at import the package loads the one that matches the
machine (torch.backends.cpu.get_cpu_capability()). Separate libraries keep code built for one
instruction set out of the others: no symbol is shared between variants.

A failed or impossible build (no compiler, no torch at build time) leaves the package importable:
CPU tensors then use the plain-PyTorch reference, and the package says so once at import.
"""

import glob
import os
import sys

from setuptools import setup

VARIANTS = {
    "avx512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c"],
    "avx2": ["-mavx2", "-mfma", "-mf16c"],
    "default": [],
}


def extensions():
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        print("dpo_kernels: torch is not importable at build time; skipping the C++ kernels")
        return [], {}
    import platform

    sources = sorted(glob.glob("csrc/*.cpp"))
    on_x86 = platform.machine().lower() in ("x86_64", "amd64")
    exts = []
    for name, flags in VARIANTS.items():
        if flags and not on_x86:
            continue
        cap = name.upper()
        macros = [("CPU_CAPABILITY", cap)] + ([(f"CPU_CAPABILITY_{cap}", None)] if flags else [])
        exts.append(
            CppExtension(
                f"dpo_kernels._C_{name}",
                sources,
                define_macros=macros,
                extra_compile_args=["-O3", "-fopenmp", *flags],
                extra_link_args=["-fopenmp"],
            )
        )

    class TolerantBuild(BuildExtension):
        """Builds each variant in its own object folder (they share sources but not flags); a
        variant that fails to build is reported, not fatal. ninja compiles a variant's files in
        parallel; variants build one after another."""

        def build_extension(self, ext):
            shared_temp = self.build_temp
            self.build_temp = os.path.join(shared_temp, ext.name)
            try:
                super().build_extension(ext)
            except Exception as exc:  # any build failure leaves the reference path
                print(f"dpo_kernels: could not build {ext.name}: {exc}", file=sys.stderr)
            finally:
                self.build_temp = shared_temp

    return exts, {"build_ext": TolerantBuild.with_options(use_ninja=True)}


ext_modules, cmdclass = extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
