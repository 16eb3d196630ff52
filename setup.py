"""Builds the package; the C++ CPU kernels in csrc/ become dpo_kernels._C."""

from setuptools import setup

setup()
