#!/usr/bin/env python
"""Mutation check: plants realistic bugs one at a time and runs the tests that should catch each.

    python scripts/mutants.py                 # every mutant (README, Testing: time and score)
    python scripts/mutants.py --list          # the mutants, and whether each still applies
    python scripts/mutants.py -k trl -k cpp   # only mutants whose name contains one of these

The tree is copied to a scratch folder; each mutant replaces one exact snippet of one file there
(`old` must occur exactly once in the current source, else the mutant is reported `stale` and
skipped: update its snippet), runs `pytest -x` on its test selection with the scratch copy first on
sys.path, and restores the file. Mutants in csrc/ rebuild the C++ library for this CPU's variant
only, into the scratch copy (ninja keeps the objects between mutants). With --baseline, the union
of the selections first runs once on the unmutated copy (a selection that fails there makes every
score meaningless, so the script stops); without it, a selection that fails for another reason
shows up as a kill whose failing test has nothing to do with the mutant.

Prints one line per mutant (killed / survived / stale, and the first failing test) and a last line
`killed K of N` (N: mutants that applied). Exit status 0 when every applied mutant was killed.
"""

from __future__ import annotations

import argparse
import ast
import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass(frozen=True)
class Mutant:
    """Replace `old` (exactly once in `path`) by `new`; `tests` are pytest arguments (node ids,
    files, `-k EXPR`) that must fail when the bug is present."""

    name: str
    path: str
    old: str
    new: str
    tests: tuple[str, ...]


def M(name: str, path: str, old: str, new: str, *tests: str) -> Mutant:
    return Mutant(name, path, old, new, tests)


T_GAPS = "tests/test_gaps.py"
T_PARITY = "tests/test_trl_parity.py"
T_LOG = "tests/test_logprobs.py"
T_LIN = "tests/test_linear_logprobs.py"
T_LOSS = "tests/test_losses.py"
VP2 = "tests/test_vocab_parallel.py::test_split_vocabulary_equals_single_process[2]"
LVP2 = "tests/test_vocab_parallel.py::test_split_lm_head_equals_single_process[2]"

# Grouped by layer. C++ mutants come last: they rebuild the library (see main()).
# fmt: off
MUTANTS: list[Mutant] = [
    # -- Triton kernels (run by the tests under TRITON_INTERPRET=1) ------------------------------
    M("triton-ignore-index-hardcoded", "dpo_kernels/ops/triton_logprobs.py",
      "counted = label != ignore_index", "counted = label != -100",
      T_GAPS, "-k", "logits_path_honours_ignore_index and triton"),
    M("triton-online-rescale-inverted", "dpo_kernels/ops/triton_logprobs.py",
      "scale = tl.exp(m - shift)", "scale = tl.exp(shift - m)",
      T_LOG, "-k", "test_matches_reference and triton and multiblock and dtype0"),
    M("triton-bwd-onehot-dropped", "dpo_kernels/ops/triton_logprobs.py",
      "dz = g * (onehot - tl.exp(z - lse))", "dz = g * (0.0 - tl.exp(z - lse))",
      T_LOG, "-k", "test_matches_reference and triton and V37 and dtype0"),
    M("triton-first-argmax-tie", "dpo_kernels/ops/triton_logprobs.py",
      "blk_arg = tl.min(tl.where(z == blk_max, index.to(tl.int64), 2**62), 0)",
      "blk_arg = tl.max(tl.where(z == blk_max, index.to(tl.int64), -1), 0)",
      T_LOG, "-k", "token_stats and triton"),
    M("triton-linear-softcap-slope", "dpo_kernels/ops/triton_linear_logprobs.py",
      "slope = a * (1 - t * t)", "slope = a * (1 - t)",
      T_LIN, "-k", "test_matches_reference and triton and softcap"),
    M("triton-linear-temperature-ignored", "dpo_kernels/ops/triton_linear_logprobs.py",
      "values = [transform.factor, transform.softcap or 0.0]",
      "values = [transform.logit_scale, transform.softcap or 0.0]",
      T_LIN, "-k", "test_matches_reference and triton and softcap"),
    M("triton-loss-robust-grad-sign", "dpo_kernels/ops/triton_dpo_loss.py",
      "du -= w * ((1.0 - eps) * tl.sigmoid(-u) + eps * tl.sigmoid(u))",
      "du -= w * ((1.0 - eps) * tl.sigmoid(-u) - eps * tl.sigmoid(u))",
      T_LOSS, "-k", "robust and triton"),
    M("triton-loss-sft-grad-not-averaged", "dpo_kernels/ops/triton_dpo_loss.py",
      "gc -= w * P / tokens", "gc -= w / tokens",
      T_LOSS, "-k", "sft and triton"),
    # -- Loss formulas: the CPU closed forms and the reference spec ------------------------------
    M("loss-robust-normalizer", "dpo_kernels/ops/torch_dpo_loss.py",
      "ell = ((1 - eps) * softplus(-u) - eps * softplus(u)) / (1 - 2 * eps)",
      "ell = ((1 - eps) * softplus(-u) - eps * softplus(u)) / (1 - eps)",
      T_LOSS, "-k", "robust and cpu"),
    M("loss-js-derivative-sign", "dpo_kernels/ops/torch_dpo_loss.py",
      "return math.log(2) + F.logsigmoid(x), sig(-x)",
      "return math.log(2) + F.logsigmoid(x), sig(x)",
      T_LOSS, "-k", "js_divergence and cpu"),
    M("loss-aot-reference-gets-policy-grad", "dpo_kernels/ops/torch_dpo_loss.py",
      "return ell, dx, -dx", "return ell, dx, dx",
      T_LOSS, "-k", "aot and cpu"),
    M("loss-apo-down-grad-sign", "dpo_kernels/ops/torch_dpo_loss.py",
      "return sc + 1 - sd, beta * sc * (1 - sc) - dd, dd",
      "return sc + 1 - sd, beta * sc * (1 - sc) - dd, -dd",
      T_LOSS, "-k", "apo_down and cpu"),
    M("loss-grads-not-divided-by-pairs", "dpo_kernels/ops/torch_dpo_loss.py",
      "return loss.mean(), loss, gc / P, gr / P", "return loss.mean(), loss, gc, gr / P",
      T_LOSS, "-k", "test_each_loss_matches and sigmoid-reverse and cpu"),
    M("reference-forward-kl-sign", "dpo_kernels/ops/reference.py",
      "return 1 - torch.exp(-x)", "return 1 - torch.exp(x)",
      T_LOSS, "-k", "forward_kl and reference"),
    M("reference-sppo-target", "dpo_kernels/ops/reference.py",
      "per = (chosen_lr - 0.5 / beta) ** 2 + (rejected_lr + 0.5 / beta) ** 2",
      "per = (chosen_lr - 0.5 / beta) ** 2 + (rejected_lr - 0.5 / beta) ** 2",
      T_LOSS, "-k", "sppo and reference"),
    M("metrics-margins-sum", "dpo_kernels/losses.py",
      '"rewards/margins": (chosen_rewards - rejected_rewards).mean()',
      '"rewards/margins": (chosen_rewards + rejected_rewards).mean()',
      T_LOSS, "-k", "metrics"),
    # -- Logits-path op and its reference -------------------------------------------------------
    M("reference-mask-or", "dpo_kernels/ops/reference.py",
      "return counted if mask is None else counted & (mask != 0)",
      "return counted if mask is None else counted | (mask != 0)",
      T_GAPS, "-k", "logits_path_honours_ignore_index and reference"),
    M("reference-linear-softcap-dropped", "dpo_kernels/ops/reference.py",
      "x = transform.softcap * torch.tanh(x / transform.softcap)\n    return x * transform.factor",
      "x = torch.tanh(x / transform.softcap)\n    return x * transform.factor",
      T_GAPS, "-k", "linear_path_honours_ignore_index and reference"),
    M("label-range-check-off-by-one", "dpo_kernels/functional.py",
      "bad_label = counted & ((labels < 0) | (labels >= vocab))",
      "bad_label = counted & ((labels < 0) | (labels > vocab))",
      "tests/test_errors.py"),
    # -- Forward: concatenated batch, LM-head transforms -----------------------------------------
    M("forward-granite-scaling-multiplies", "dpo_kernels/forward.py",
      "else 1.0 / cfg.logits_scaling", "else cfg.logits_scaling",
      T_GAPS, "-k", "family_transform and granite"),
    M("forward-softcap-not-read", "dpo_kernels/forward.py",
      '"softcap": getattr(cfg, "final_logit_softcapping", None)', '"softcap": None',
      T_GAPS, "-k", "family_transform and gemma2"),
    M("forward-mask-not-shifted", "dpo_kernels/forward.py",
      "mask = (b.completion_mask[:, 1:] != 0) & (b.attention_mask[:, 1:] != 0)",
      "mask = (b.completion_mask[:, :-1] != 0) & (b.attention_mask[:, 1:] != 0)",
      T_GAPS, "-k", "family_transform and padded and cohere"),
    M("forward-fused-hidden-shifted", "dpo_kernels/forward.py",
      "hidden = seen[-1][0] if padding_free else seen[-1][:, :-1]",
      "hidden = seen[-1][0] if padding_free else seen[-1][:, 1:]",
      T_GAPS, "-k", "family_transform and padded and cohere"),
    # -- Packed layout ---------------------------------------------------------------------------
    M("pack-ends-marked-at-starts", "dpo_kernels/forward.py",
      "last[cu[1:].long() - 1] = True", "last[cu[:-1].long()] = True",
      T_GAPS, "-k", "pack_labels or completions_at_every_boundary"),
    M("pack-mask-not-rolled", "dpo_kernels/forward.py",
      "mask = torch.roll(completion, -1) & ~last", "mask = completion & ~last",
      T_GAPS, "-k", "pack_labels"),
    M("pack-positions-not-restarted", "dpo_kernels/forward.py",
      "position = torch.arange(ids.numel(), device=ids.device) - starts",
      "position = torch.arange(ids.numel(), device=ids.device)",
      T_GAPS, "-k", "completions_at_every_boundary"),
    M("segment-count-shifted", "dpo_kernels/functional.py",
      "c = torch.nn.functional.pad(counted.long().cumsum(0), (1, 0))",
      "c = torch.nn.functional.pad(counted.long().cumsum(0), (0, 1))",
      T_GAPS, "-k", "first_and_last_tokens and reference"),
    M("cu-seqlens-decrease-allowed", "dpo_kernels/functional.py",
      "any(b < a for a, b in itertools.pairwise(cu))",
      "any(b < a - 1 for a, b in itertools.pairwise(cu))",
      "tests/test_packed.py", "-k", "bad_cu_seqlens"),
    # -- Vocabulary-parallel path ----------------------------------------------------------------
    M("vocab-parallel-lse-unshifted", "dpo_kernels/functional.py",
      "return top + torch.log(_all_reduce(torch.exp(lse_local - top), group))",
      "return torch.log(_all_reduce(torch.exp(lse_local - top), group))",
      VP2),
    M("vocab-parallel-offshard-grad", "dpo_kernels/functional.py",
      "dz[b, t, a] = (-grad_tok[b, t].to(lse.dtype) * p).to(dz.dtype)",
      "dz[b, t, a] = (grad_tok[b, t].to(lse.dtype) * (1 - p)).to(dz.dtype)",
      VP2),
    M("vocab-parallel-hidden-grad-not-reduced", "dpo_kernels/functional.py",
      "        _all_reduce(dh, group)\n        return dh,", "        return dh,",
      LVP2),
    # -- TRL integration -------------------------------------------------------------------------
    M("trl-f-divergence-dropped", "dpo_kernels/integrations/trl.py",
      "            f_divergence_type=self.f_divergence_type,\n", "",
      T_PARITY, "-k", "forward_kl"),
    M("trl-discopop-tau-dropped", "dpo_kernels/integrations/trl.py",
      "            discopop_tau=self.args.discopop_tau,\n", "",
      T_PARITY, "-k", "tau"),
    M("trl-label-smoothing-dropped", "dpo_kernels/integrations/trl.py",
      "            label_smoothing=self.label_smoothing,\n", "",
      T_PARITY, "-k", "robust"),
    M("trl-ld-alpha-maximum", "dpo_kernels/integrations/trl.py",
      "shared = torch.minimum(*lens.chunk(2))", "shared = torch.maximum(*lens.chunk(2))",
      T_PARITY, "-k", "sigmoid-ld_alpha"),
    # (Counting the shifted completion mask instead is equivalent unless a completion starts at
    # token 0, which TRL's tokenized prompts never do: not a useful mutant.)
    M("trl-counts-include-prompt", "dpo_kernels/integrations/trl.py",
      "counts = b.completion_mask.sum(1).chunk(2)",
      "counts = b.attention_mask.sum(1).chunk(2)",
      T_PARITY, "-k", "ipo or sigmoid_norm"),
    M("trl-logits-metric-from-rejected", "dpo_kernels/integrations/trl.py",
      'metrics["logits/chosen"].append(ratio(c_mean[c_mask].sum(), c_mask.sum()))',
      'metrics["logits/chosen"].append(ratio(r_mean[r_mask].sum(), r_mask.sum()))',
      T_PARITY, "-k", "hinge"),
    # -- C++ kernels (rebuilt) -------------------------------------------------------------------
    M("cpp-ignore-index-hardcoded", "csrc/logprobs.cpp",
      "if (y == ignore_index) return -1;", "if (y == -100) return -1;",
      T_GAPS, "-k", "logits_path_honours_ignore_index and cpu"),
    M("cpp-online-rescale-inverted", "csrc/vec_rows.h",
      "const A scale = std::exp(f.m - shift);", "const A scale = std::exp(shift - f.m);",
      T_LOG, "-k", "test_matches_reference and cpu and multiblock"),
    M("cpp-grad-tail-without-lse", "csrc/vec_rows.h",
      "for (; i < V; ++i) out[i] = static_cast<S>(-g * std::exp(static_cast<A>(z[i]) - lse));",
      "for (; i < V; ++i) out[i] = static_cast<S>(-g * std::exp(static_cast<A>(z[i])));",
      T_LOG, "-k", "test_matches_reference and cpu and V37"),
    M("cpp-argmax-offset-dropped", "csrc/vec_rows.h",
      "f.arg = offset + start + i;", "f.arg = start + i;",
      T_GAPS, "-k", "later_blocks and cpu"),
    M("cpp-softcap-cap-dropped", "csrc/vec_rows.h",
      "return vc * (v / vc).tanh() * va;", "return (v / vc).tanh() * va;",
      T_LIN, "-k", "test_matches_reference and cpu and softcap"),
    M("cpp-label-slope-without-tanh", "csrc/vec_rows.h",
      "dzdx = tf.a * (A(1) - t * t);", "dzdx = tf.a;",
      T_LIN, "-k", "test_matches_reference and cpu and softcap"),
    M("cpp-temperature-multiplies", "csrc/linear_logprobs.cpp",
      "static_cast<A>(logit_scale / temperature)", "static_cast<A>(logit_scale * temperature)",
      T_LIN, "-k", "test_matches_reference and cpu and softcap"),
    M("cpp-strides-assumed-contiguous", "csrc/common.h",
      "return x.stride(-1) == 1 ? x : x.contiguous();", "return x;",
      T_GAPS, "-k", "vocabulary_stride and cpu"),
]
# fmt: on


def is_cpp(m: Mutant) -> bool:
    return m.path.startswith("csrc/")


def status(m: Mutant) -> str:
    """'ok' when `old` occurs exactly once in the current source, else why not."""
    path = os.path.join(ROOT, m.path)
    if not os.path.exists(path):
        return f"stale: {m.path} does not exist"
    n = open(path).read().count(m.old)
    if n == 1:
        return "ok"
    return "stale: snippet not found" if n == 0 else f"stale: snippet found {n} times"


# -- scratch copy and C++ rebuild ----------------------------------------------------------------

_SKIP = shutil.ignore_patterns(
    ".git", ".venv", "build", "__pycache__", "*.egg-info", ".pytest_cache", ".ruff_cache",
    ".benchmarks", ".hypothesis", "out",
)  # fmt: skip


def make_scratch() -> str:
    scratch = tempfile.mkdtemp(prefix="dpo_mutants_")
    tree = os.path.join(scratch, "tree")
    shutil.copytree(ROOT, tree, ignore=_SKIP, symlinks=True)
    return tree


def env_for(tree: str) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=tree + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


def cpu_variant() -> str | None:
    """The C++ variant this machine loads (dpo_kernels._cpu.VARIANT), from a fresh process."""
    code = "import dpo_kernels._cpu as c; print(c.VARIANT)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env_for(ROOT),
                         capture_output=True, text=True)  # fmt: skip
    v = out.stdout.strip().splitlines()[-1] if out.stdout.strip() else "None"
    return None if v == "None" else v


def variant_flags(variant: str) -> list[str]:
    """Compiler flags of `variant`, read from setup.py's VARIANTS table."""
    tree = ast.parse(open(os.path.join(ROOT, "setup.py")).read())
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "VARIANTS" for t in node.targets
        ):
            return list(ast.literal_eval(node.value)[variant])
    raise RuntimeError("setup.py has no VARIANTS table; update variant_flags() in this script")


_BUILD = """
import sys
from torch.utils.cpp_extension import load
name, build_dir, flags = sys.argv[1], sys.argv[2], sys.argv[3:]
load(name=name, sources=sys.stdin.read().split(), extra_cflags=flags, extra_ldflags=["-fopenmp"],
     build_directory=build_dir, is_python_module=False, verbose=False)
"""


def build_cpp(tree: str, variant: str, build_dir: str) -> tuple[bool, str]:
    """Builds csrc/ of `tree` as dpo_kernels/_C_<variant> (this variant only) and puts it where
    the package loads it from. Returns (ok, error text)."""
    cap = variant.upper()
    flags = ["-O3", "-fopenmp", *variant_flags(variant), f"-DCPU_CAPABILITY={cap}"]
    if variant != "default":
        flags.append(f"-DCPU_CAPABILITY_{cap}")
    sources = sorted(glob.glob(os.path.join(tree, "csrc", "*.cpp")))
    name = f"_C_{variant}"
    proc = subprocess.run([sys.executable, "-c", _BUILD, name, build_dir, *flags],
                          input=" ".join(sources), capture_output=True, text=True)  # fmt: skip
    if proc.returncode != 0:
        return False, (proc.stdout + proc.stderr)[-2000:]
    pkg = os.path.join(tree, "dpo_kernels")
    targets = glob.glob(os.path.join(pkg, f"{name}.*so")) or [os.path.join(pkg, f"{name}.so")]
    for t in targets:
        if os.path.exists(t):
            os.remove(t)
    shutil.copy2(os.path.join(build_dir, f"{name}.so"), targets[0])
    return True, ""


# -- running tests -------------------------------------------------------------------------------


def run_pytest(tree: str, args: tuple[str, ...] | list[str], timeout: float) -> tuple[str, str]:
    """(outcome, detail): outcome 'pass', 'fail', 'error', 'empty' or 'timeout'."""
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "--no-header",
           "-rfE", "-W", "ignore", *args]  # fmt: skip
    try:
        proc = subprocess.run(cmd, cwd=tree, env=env_for(tree), capture_output=True, text=True,
                              timeout=timeout)  # fmt: skip
    except subprocess.TimeoutExpired:
        return "timeout", f"over {timeout:.0f} s"
    out = proc.stdout + proc.stderr
    first = re.search(r"^(?:FAILED|ERROR) (\S+)", out, re.M)
    detail = first.group(1) if first else out.strip().splitlines()[-1] if out.strip() else ""
    if proc.returncode == 0:
        return "pass", out.strip().splitlines()[-1] if out.strip() else ""
    if proc.returncode == 1:
        return "fail", detail
    if proc.returncode == 5:
        return "empty", "the selection matched no test"
    return "error", detail or out[-500:]


def baseline_selection(mutants: list[Mutant]) -> tuple[list[str], str]:
    """One pytest selection that covers every mutant's: the files, and their -k expressions joined
    by `or` (a selection without -k contributes its file or test function name)."""
    files: list[str] = []
    exprs: list[str] = []
    for m in mutants:
        args = list(m.tests)
        expr = args[args.index("-k") + 1] if "-k" in args else None
        for t in (t for t in args if t.startswith("tests/")):
            file, _, func = t.partition("::")
            files += [file] if file not in files else []
            if expr is None:
                exprs.append(func.split("[")[0] if func else os.path.basename(file)[:-3])
        if expr is not None:
            exprs.append(expr)
    return files, " or ".join(f"({e})" for e in dict.fromkeys(exprs))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("-k", action="append", default=[], help="only mutants whose name has this")
    p.add_argument("--list", action="store_true", help="list the mutants and whether they apply")
    p.add_argument(
        "--baseline",
        action="store_true",
        help="first run every selection once on the unmutated copy (stops if one fails)",
    )
    p.add_argument("--timeout", type=float, default=600, help="seconds per mutant")
    p.add_argument("--keep", action="store_true", help="keep the scratch folder")
    a = p.parse_args(argv)

    mutants = [m for m in MUTANTS if not a.k or any(k in m.name for k in a.k)]
    if a.list:
        for m in mutants:
            print(f"{m.name:42s} {m.path:42s} {status(m)}")
        print(f"{len(mutants)} mutants")
        return 0
    mutants.sort(key=is_cpp)  # C++ last: the rebuilt library then never outlives its mutant
    applicable = [m for m in mutants if status(m) == "ok"]
    t0 = time.time()
    tree = make_scratch()
    print(f"scratch copy: {tree}", flush=True)
    try:
        code = "import dpo_kernels; print(dpo_kernels.__file__)"
        where = subprocess.run([sys.executable, "-c", code], cwd=tree, env=env_for(tree),
                               capture_output=True, text=True)  # fmt: skip
        if not where.stdout.startswith(tree):
            print(f"dpo_kernels imports from outside the copy: {where.stdout}{where.stderr}")
            return 2
        if a.baseline and applicable:
            files, exprs = baseline_selection(applicable)
            outcome, detail = run_pytest(tree, [*files, "-k", exprs], a.timeout * 3)
            print(f"baseline (unmutated, every selection at once): {outcome} {detail}", flush=True)
            if outcome != "pass":
                print("the selections fail without any mutant; fix that first")
                return 2
        variant = cpu_variant() if any(is_cpp(m) for m in applicable) else None
        build_dir = os.path.join(os.path.dirname(tree), "cpp_build")
        os.makedirs(build_dir, exist_ok=True)
        killed = ran = 0
        survivors: list[str] = []
        for m in mutants:
            st = status(m)
            if st != "ok":
                print(f"STALE     {m.name}: {st} in {m.path}", flush=True)
                continue
            target = os.path.join(tree, m.path)
            pristine = open(os.path.join(ROOT, m.path)).read()
            started = time.time()
            try:
                with open(target, "w") as f:
                    f.write(pristine.replace(m.old, m.new, 1))
                if is_cpp(m):
                    if variant is None:
                        print(f"SKIPPED   {m.name}: no C++ variant loads on this machine")
                        continue
                    ok, err = build_cpp(tree, variant, build_dir)
                    if not ok:
                        print(f"INVALID   {m.name}: does not compile: {err.splitlines()[-1:]}")
                        continue
                outcome, detail = run_pytest(tree, m.tests, a.timeout)
            finally:
                with open(target, "w") as f:
                    f.write(pristine)
            ran += 1
            secs = time.time() - started
            if outcome in ("fail", "error", "timeout"):
                killed += 1
                print(f"killed    {m.name} ({secs:.0f} s): {outcome} {detail}", flush=True)
            else:
                survivors.append(m.name)
                print(f"SURVIVED  {m.name} ({secs:.0f} s): {outcome} {detail}", flush=True)
        if a.keep and variant is not None and any(is_cpp(m) for m in applicable):
            build_cpp(tree, variant, build_dir)  # leave the scratch library unmutated (--keep)
        print(f"time {time.time() - t0:.0f} s; survived: {', '.join(survivors) or 'none'}")
        print(f"killed {killed} of {ran}")
        return 0 if killed == ran else 1
    finally:
        if not a.keep:
            shutil.rmtree(os.path.dirname(tree), ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
