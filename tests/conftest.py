"""Shared test setup: Triton kernels run on CPU tensors through the interpreter.

With DPO_KERNELS_TEST_DEVICE=cuda (scripts/gpu.sh) the same tests run on CUDA tensors instead:
tensors created without a device go to the GPU, the Triton kernels are compiled (no interpreter),
and the backends under test are the reference and Triton. Every comparison is then made on the
GPU: float64 reference and naive same-dtype computation included.
"""

import os

TEST_DEVICE = os.environ.get("DPO_KERNELS_TEST_DEVICE", "cpu")
if TEST_DEVICE not in ("cpu", "cuda"):
    raise ValueError(f"DPO_KERNELS_TEST_DEVICE must be cpu or cuda, got {TEST_DEVICE!r}")
# Must be set before triton.jit decorates the kernels (at dpo_kernels import).
if TEST_DEVICE == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")
elif os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    raise RuntimeError(
        "DPO_KERNELS_TEST_DEVICE=cuda runs the compiled kernels: unset TRITON_INTERPRET"
    )
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import importlib.util  # noqa: E402  (after the environment the imports read)

import pytest  # noqa: E402
import torch  # noqa: E402

import dpo_kernels  # noqa: E402

HAS_TRITON = importlib.util.find_spec("triton") is not None
if TEST_DEVICE == "cuda":
    torch.set_default_device("cuda")
# Trainers in the tests run where the tensors do (TrainingArguments). On CUDA the collators make
# their tensors on the default device, which the DataLoader cannot pin.
TRAINER_DEVICE = {"use_cpu": True} if TEST_DEVICE == "cpu" else {"dataloader_pin_memory": False}

# Precision of a float32 accumulation, per step. The interpreter's exp and log are numpy's
# (correctly rounded to about 1 ulp); compiled for a GPU, tl.exp and tl.log are ex2.approx and
# lg2.approx (2 ulp, plus the rounding of x * log2(e) before ex2): 4 ulp there.
EPS32 = 2**-23 if TEST_DEVICE == "cpu" else 4 * 2**-23


def cpu_backends() -> list[str]:
    """Every backend that can run on the tests' tensors here (CPU; CUDA with
    DPO_KERNELS_TEST_DEVICE=cuda, where the C++ CPU backend does not apply)."""
    if TEST_DEVICE == "cuda":
        return ["reference", "triton"]
    names = ["reference"]
    if dpo_kernels.cpu_extension_available():
        names.append("cpu")
    if HAS_TRITON:
        names.append("triton")
    return names


# Per-dtype absolute/relative slack on top of the naive computation's own error.
TOL = {
    torch.float64: (1e-10, 1e-12),
    torch.float32: (2e-5, 2e-6),
    torch.bfloat16: (2e-5, 2e-6),
    torch.float16: (2e-5, 2e-6),
}
# Gradients are stored in the input dtype: one rounding of that dtype on top.
GRAD_TOL = {
    torch.float64: 1e-12,
    torch.float32: 1e-6,
    torch.bfloat16: 2**-8,
    torch.float16: 2**-11,
}


def assert_no_worse_than_naive(ours, naive, ref64, tol, what="", bound=None):
    """|ours - ref64| <= |naive - ref64| + tol, in the max norm, on the finite entries; with
    `bound`, also |ours - ref64| <= bound (an absolute limit from float32 accumulation: the naive
    error alone can be huge, e.g. an fp16 sum that overflows, and then allows anything).

    Infinite or NaN entries of ref64 must be matched exactly (same inf, or NaN).
    """
    ours, naive, ref64 = ours.double(), naive.double(), ref64.double()
    finite = torch.isfinite(ref64)
    assert torch.equal(torch.isnan(ours[~finite]), torch.isnan(ref64[~finite])), what
    both_inf = ~finite & ~torch.isnan(ref64)
    assert torch.equal(ours[both_inf], ref64[both_inf]), what
    if not finite.any():
        return
    err = (ours[finite] - ref64[finite]).abs().max().item()
    naive_err = (naive[finite] - ref64[finite]).abs().nan_to_num(0.0).max().item()
    assert err <= naive_err + tol, f"{what}: error {err:.3g} > naive {naive_err:.3g} + {tol:.3g}"
    if bound is not None:
        assert err <= bound, f"{what}: error {err:.3g} > {bound:.3g} (float32 accumulation)"


def record_calls(monkeypatch, module, *names: str) -> list[str]:
    """Wraps each `module.<name>` so that every call appends its name to the returned list."""
    calls = []
    for name in names:
        fn = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, fn=fn, name=name: calls.append(name) or fn(*a))
    return calls


def poison_empty(monkeypatch) -> None:
    """Makes every floating `torch.empty` and `Tensor.new_empty` called from Python come back
    filled with NaN: a buffer read before it is written (a zero fill assumed, an accumulation
    into fresh memory) then shows in the results instead of passing on memory that happened to
    be zero."""

    def poison(make):
        def poisoned(*args, **kwargs):
            out = make(*args, **kwargs)
            return out.fill_(float("nan")) if out.is_floating_point() else out

        return poisoned

    monkeypatch.setattr(torch, "empty", poison(torch.empty))
    monkeypatch.setattr(torch.Tensor, "new_empty", poison(torch.Tensor.new_empty))


# DPO_KERNELS_TEST_SEED=N draws other random inputs: a tolerance that holds only for seed 0 is
# a flaky test waiting for its day (CI uses 0).
SEED = int(os.environ.get("DPO_KERNELS_TEST_SEED", "0"))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(SEED)


@pytest.fixture(autouse=True)
def _no_tf32_leak():
    """Restores the TF32 switches after each test: a TrainingArguments with torch_compile=True
    turns TF32 on for the whole process (transformers' enable_tf32, accelerate's legacy
    allow_tf32), and on a GPU the later tests of that worker then compared stock and ours at
    TF32's precision (1e-3 per logit). Both APIs: the legacy one first, then torch >= 2.9's."""
    legacy = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    switches = (torch.backends, torch.backends.cuda.matmul, torch.backends.cudnn)
    switches = [s for s in switches if hasattr(s, "fp32_precision")]
    saved = [s.fp32_precision for s in switches]
    yield
    torch.set_float32_matmul_precision(legacy[0])
    torch.backends.cudnn.allow_tf32 = legacy[1]
    for s, v in zip(switches, saved, strict=True):
        s.fp32_precision = v


# Other families: their config class and its own size arguments (the shared ones below).
OTHER_FAMILIES = {
    "qwen2": ("Qwen2Config", dict(num_key_value_heads=2)),
    "gpt_neox": ("GPTNeoXConfig", {}),
    "opt": ("OPTConfig", dict(ffn_dim=64, word_embed_proj_dim=32)),
    "bloom": ("BloomConfig", dict(n_head=4, n_layer=2)),
    "mpt": ("MptConfig", dict(d_model=32, n_heads=4, n_layers=2)),
    "roberta": ("RobertaConfig", dict(is_decoder=True)),  # a transform between backbone and head
    "xlm": ("XLMConfig", {}),  # causal=False: attention both ways
}


def tiny_causal_lm(kind: str = "llama", vocab: int = 97, seed: int = 0, attn: str | None = None,
                   tie: bool = False):  # fmt: skip
    """A small random causal LM built from a config (nothing is downloaded), float32, eval mode:
    Llama, GPT-2 or one of OTHER_FAMILIES (`attn`: their attn_implementation; `tie`: Llama's LM
    head tied to its embeddings)."""
    import transformers

    torch.manual_seed(seed)
    if kind == "llama":
        cfg = transformers.LlamaConfig(
            vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
            tie_word_embeddings=tie,
        )  # fmt: skip
        model = transformers.LlamaForCausalLM(cfg)
    elif kind == "gpt2":
        cfg = transformers.GPT2Config(
            vocab_size=vocab, n_embd=32, n_layer=2, n_head=4, n_positions=128,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
        )  # fmt: skip
        model = transformers.GPT2LMHeadModel(cfg)
    elif kind in OTHER_FAMILIES:
        name, extra = OTHER_FAMILIES[kind]
        cfg = getattr(transformers, name)(
            vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=64, max_position_embeddings=128, **extra,
        )  # fmt: skip
        model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation=attn)
    else:
        raise ValueError(kind)
    return model.eval()


def scaled_head_lm():
    """A tiny Llama whose LM head class has a forward of its own (the logits times 2, the same
    weight), which the fused head would read as its weight alone."""

    class ScaledHead(torch.nn.Linear):
        def forward(self, x):
            return super().forward(x) * 2.0

    model = tiny_causal_lm()
    scaled = ScaledHead(32, 97, bias=False)
    scaled.weight = model.lm_head.weight
    model.lm_head = scaled
    return model


def prompt_tuned_lm():
    """A tiny Llama under a prompt-learning PEFT adapter (2 virtual tokens before every row)."""
    peft = pytest.importorskip("peft")
    config = peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2)
    return peft.get_peft_model(tiny_causal_lm(), config)


def preference_examples(n: int, vocab: int = 97, seed: int = 0):
    """Token-id preference examples of varied prompt and completion lengths."""
    g = torch.Generator(torch.get_default_device()).manual_seed(seed)

    def ids(lo, hi):
        k = int(torch.randint(lo, hi, (1,), generator=g))
        return torch.randint(3, vocab, (k,), generator=g).tolist()

    return [
        {"prompt_ids": ids(2, 8), "chosen_ids": ids(1, 9), "rejected_ids": ids(1, 9)}
        for _ in range(n)
    ]


# Data checks (label and mask values, cu_seqlens contents) are device-side asserts on CUDA, and one
# ends the process's CUDA context: cases marked `data_check` are skipped there, and
# test_cuda_ready.py::test_device_side_asserts_in_child_processes makes them in fresh processes.
data_check = pytest.mark.data_check

# Tests about CPU-only machinery (the C++ backend on CPU tensors, gloo process groups, the CPU
# benchmark and example, building the wheel from the package index): skipped when the suite runs
# on CUDA tensors, as are single tests marked `cpu_only`.
CPU_ONLY_MODULES = ("test_cpu_backend.py", "test_distributed.py", "test_bench_cli.py",
                    "test_engines.py", "test_install.py", "test_sentiment_frontier.py")  # fmt: skip
cpu_only = pytest.mark.cpu_only


def pytest_collection_modifyitems(config, items):
    if TEST_DEVICE != "cuda":
        return
    skip = pytest.mark.skip(reason="CPU-only test (DPO_KERNELS_TEST_DEVICE=cuda)")
    assert_skip = pytest.mark.skip(reason="a device-side assert on CUDA: made in a child process")
    for item in items:
        if item.path.name in CPU_ONLY_MODULES or item.get_closest_marker("cpu_only"):
            item.add_marker(skip)
        elif item.get_closest_marker("data_check"):
            item.add_marker(assert_skip)
