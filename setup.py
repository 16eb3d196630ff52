"""Packaging: pure Python plus the C++ sources; nothing is compiled here.

csrc/ (the C++ CPU kernels) goes into the wheel as package data under dpo_kernels/csrc. The
kernels are compiled on the user's machine, for the torch and CPU in use, on first use from CPU
tensors or with `dpo-kernels build` (dpo_kernels/_build.py). The build needs neither torch nor a
compiler.
"""

from setuptools import find_packages, setup

setup(
    packages=[*find_packages(include=["dpo_kernels", "dpo_kernels.*"]), "dpo_kernels.csrc"],
    package_dir={"dpo_kernels.csrc": "csrc"},
    package_data={"dpo_kernels.csrc": ["*.cpp", "*.h"]},
)
