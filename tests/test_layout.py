"""The layout's promises: one dispatch over backends with the same functions, a shared vocabulary
that imports nothing else from the package, no Triton import for CPU-only use, and the values
that carry a spec or a logit transform through op schemas losing nothing."""

import ast
import os
import pathlib
import subprocess
import sys

import pytest
from conftest import HAS_TRITON

import dpo_kernels
from dpo_kernels import backend, common
from dpo_kernels.common import LOSS_TYPES, DPOLossSpec, LogitTransform

PACKAGE = pathlib.Path(dpo_kernels.__file__).parent


@pytest.mark.parametrize("name", ["reference", "cpu"] + (["triton"] if HAS_TRITON else []))
def test_every_backend_offers_the_same_functions(name):
    module = backend.kernels(name)
    missing = [f for f in backend.FUNCTIONS if not callable(getattr(module, f, None))]
    missing += [c for c in backend.CONSTANTS if not isinstance(getattr(module, c, None), int)]
    assert not missing, f"backend {name!r} lacks {missing}"


def test_common_imports_nothing_from_the_package():
    tree = ast.parse((PACKAGE / "common.py").read_text())
    relative = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level]
    absolute = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    assert not relative and not any(m.startswith("dpo_kernels") for m in absolute)


def test_cpu_use_imports_no_triton_backend():
    # (torch itself may import the triton package; our Triton modules must stay unloaded)
    code = (
        "import sys, torch, dpo_kernels\n"
        "x = torch.randn(2, 3, 5, requires_grad=True)\n"
        "dpo_kernels.sequence_logprobs(x, torch.randint(0, 5, (2, 3))).logps.sum().backward()\n"
        "print(sorted(m for m in sys.modules if m.startswith('dpo_kernels.ops.triton')))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(PACKAGE.parent), "TRITON_INTERPRET": "0"}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
    )
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize(
    "transform", [LogitTransform(), LogitTransform(0.5, 30.0, 0.7), LogitTransform(2.0, None, 3.0)]
)
def test_logit_transform_survives_packing(transform):
    packed = transform.pack()
    assert all(isinstance(v, float) for v in packed)
    assert LogitTransform.unpack(packed) == transform


def test_loss_spec_survives_packing():
    spec = DPOLossSpec(("ipo", "sigmoid"), (0.5, 2.0), 0.3, 0.1, "alpha_divergence", 0.7, 0.2)
    back = DPOLossSpec.unpack(*spec.pack())
    # Types come back in LOSS_TYPES order with their weights; hyper-parameters unchanged.
    assert back == DPOLossSpec(
        ("sigmoid", "ipo"), (2.0, 0.5), 0.3, 0.1, "alpha_divergence", 0.7, 0.2
    )
    repeated = DPOLossSpec(("sft", "sft"), (1.0, 2.0))
    assert DPOLossSpec.unpack(*repeated.pack()).loss_weights == (3.0,)


def test_loss_table_drives_the_flags():
    assert set(common.LOSSES) == set(LOSS_TYPES)
    assert common.loss_types_where("sorting") == {"aot", "aot_unpaired"}
    assert common.loss_types_where("count_coupled") == {"sft"}
    assert common.loss_types_where("needs_counts") == {"ipo", "sigmoid_norm", "sft"}
    rest, coupled = DPOLossSpec(("sigmoid", "sft"), (1.0, 0.5)).split({"sft"})
    assert (rest.loss_types, coupled.loss_types, coupled.loss_weights) == (
        ("sigmoid",),
        ("sft",),
        (0.5,),
    )


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_triton_kernel_types_are_table_types_that_do_not_sort():
    from dpo_kernels.ops import triton_dpo_loss

    kernel = set(triton_dpo_loss.KERNEL_TYPES)
    assert kernel <= set(LOSS_TYPES) - common.loss_types_where("sorting")
    assert len(kernel) == len(triton_dpo_loss.KERNEL_TYPES)  # each registered once
