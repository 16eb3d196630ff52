#!/usr/bin/env python
"""Mutation check: plants realistic bugs one at a time and runs the tests that should catch each.

    python scripts/mutants.py                 # every mutant (README, Testing: time and score)
    python scripts/mutants.py --list          # the mutants, and whether each still applies
    python scripts/mutants.py -k trl -k cpp   # only mutants whose name contains one of these

The tree is copied to a scratch folder; each mutant replaces one exact snippet of one file there
(`old` must occur exactly once in the current source, else the mutant is reported `stale` and
skipped: update its snippet), runs `pytest -x` on its test selection with the scratch copy first on
sys.path, and restores the file. The tests run with DPO_KERNELS_CACHE_DIR set to a cache inside
the scratch folder: dpo_kernels._build keys its compiled C++ library by a hash of csrc/, so the
unmutated library (built, or copied from this machine's cache, once at the start) serves every
Python mutant, and a csrc/ mutant gets its own library. That one is compiled first by `python -m
dpo_kernels build` in the copy; a mutant that does not compile or load is reported `BUILD FAILED`
and not counted (its tests would otherwise fall back to the plain-PyTorch reference and pass or
fail for reasons unrelated to the mutant). With --baseline, the union of the selections first
runs once on the unmutated copy (a selection that fails there makes every score meaningless, so
the script stops); without it, a selection that fails for another reason shows up as a kill whose
failing test has nothing to do with the mutant.

Prints one line per mutant (killed / survived / stale / build failed, and the first failing test)
and a last line `killed K of N` (N: mutants that applied and, for C++, built). Exit status 0 when
every applied mutant was killed and every C++ mutant built.
"""

from __future__ import annotations

import argparse
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
T_LDPO = "tests/test_linear_dpo.py"
T_CUDA_READY = "tests/test_cuda_ready.py"
VP2 = "tests/test_vocab_parallel.py::test_split_vocabulary_equals_single_process[2]"
LVP2 = "tests/test_vocab_parallel.py::test_split_lm_head_equals_single_process[2]"

# Grouped by layer. C++ mutants come last: each one compiles its own library (see main()).
# fmt: off
MUTANTS: list[Mutant] = [
    # -- Triton kernels (run by the tests under TRITON_INTERPRET=1) ------------------------------
    M("triton-ignore-index-hardcoded", "dpo_kernels/ops/triton_logprobs.py",
      "counted = label != ignore_index", "counted = label != -100",
      T_GAPS, "-k", "logits_path_honours_ignore_index and triton"),
    M("triton-online-rescale-inverted", "dpo_kernels/ops/triton_common.py",
      "scale = tl.exp(m - shift)", "scale = tl.exp(shift - m)",
      T_LOG, "-k", "test_matches_reference and triton and multiblock and dtype0"),
    M("triton-bwd-onehot-dropped", "dpo_kernels/ops/triton_logprobs.py",
      "dz = g * (onehot - tl.exp(z - lse))", "dz = g * (0.0 - tl.exp(z - lse))",
      T_LOG, "-k", "test_matches_reference and triton and V37 and dtype0"),
    M("triton-first-argmax-tie", "dpo_kernels/ops/triton_common.py",
      "blk_arg = tl.min(tl.where(z == blk_max, index, 2**31 - 1), 0)",
      "blk_arg = tl.max(tl.where(z == blk_max, index, -1), 0)",
      T_LOG, "-k", "token_stats and triton"),
    M("triton-linear-softcap-slope", "dpo_kernels/ops/triton_linear_logprobs.py",
      "slope = a * (1 - t * t)", "slope = a * (1 - t)",
      T_LIN, "-k", "test_matches_reference and triton and softcap"),
    M("triton-linear-temperature-ignored", "dpo_kernels/ops/triton_linear_logprobs.py",
      "values = (float(transform.factor), float(transform.softcap or 0.0))",
      "values = (float(transform.logit_scale), float(transform.softcap or 0.0))",
      T_LIN, "-k", "test_matches_reference and triton and temperature"),
    M("triton-loss-robust-grad-sign", "dpo_kernels/ops/triton_dpo_loss.py",
      "du -= w * ((1.0 - eps) * tl.sigmoid(-u) + eps * tl.sigmoid(u))",
      "du -= w * ((1.0 - eps) * tl.sigmoid(-u) - eps * tl.sigmoid(u))",
      T_LOSS, "-k", "robust and triton"),
    M("triton-loss-sft-grad-not-averaged", "dpo_kernels/ops/triton_dpo_loss.py",
      "gc -= w * P / tokens", "gc -= w / tokens",
      T_LOSS, "-k", "sft and triton"),
    # -- Loss formulas: the CPU closed forms and the reference spec ------------------------------
    M("loss-robust-normalizer", "dpo_kernels/ops/torch_dpo_loss.py",
      "return ell / (1 - 2 * eps), du / (1 - 2 * eps)",
      "return ell / (1 - eps), du / (1 - eps)",
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
      T_LOSS, "-k", "forward_kl and spec"),
    M("reference-sppo-target", "dpo_kernels/ops/reference.py",
      "per = (chosen_lr - 0.5 / beta) ** 2 + (rejected_lr + 0.5 / beta) ** 2",
      "per = (chosen_lr - 0.5 / beta) ** 2 + (rejected_lr - 0.5 / beta) ** 2",
      T_LOSS, "-k", "sppo and spec"),
    M("metrics-margins-sum", "dpo_kernels/losses.py",
      '"rewards/margins": (chosen_rewards - rejected_rewards).mean()',
      '"rewards/margins": (chosen_rewards + rejected_rewards).mean()',
      T_LOSS, "-k", "metrics"),
    # -- Logits-path op and its reference -------------------------------------------------------
    M("reference-mask-or", "dpo_kernels/common.py",
      "return counted if mask is None else counted & (mask != 0)",
      "return counted if mask is None else counted | (mask != 0)",
      T_GAPS, "-k", "logits_path_honours_ignore_index and reference"),
    M("reference-linear-softcap-dropped", "dpo_kernels/ops/reference.py",
      "x = tf.softcap * torch.tanh(x / tf.softcap)\n    return x * tf.factor",
      "x = torch.tanh(x / tf.softcap)\n    return x * tf.factor",
      T_GAPS, "-k", "linear_path_honours_ignore_index and reference"),
    M("label-range-check-off-by-one", "dpo_kernels/validation.py",
      "counted & ((labels < 0) | (labels >= vocab))",
      "counted & ((labels < 0) | (labels > vocab))",
      "tests/test_errors.py"),
    # -- Forward: concatenated batch, LM-head transforms -----------------------------------------
    M("forward-granite-scaling-multiplies", "dpo_kernels/fused_head.py",
      "else 1.0 / cfg.logits_scaling", "else cfg.logits_scaling",
      T_GAPS, "-k", "family_transform and granite"),
    M("forward-softcap-not-read", "dpo_kernels/fused_head.py",
      '"softcap": next(iter(caps.values()), None)', '"softcap": None',
      T_GAPS, "-k", "family_transform and gemma2"),
    M("forward-mask-not-shifted", "dpo_kernels/forward.py",
      "mask = (b.completion_mask[:, 1:] != 0) & am[:, 1:]",
      "mask = (b.completion_mask[:, :-1] != 0) & am[:, 1:]",
      T_GAPS, "-k", "family_transform and padded and cohere"),
    M("forward-fused-hidden-shifted", "dpo_kernels/fused_head.py",
      "hidden = hidden, hidden[0] if call.cu_seqlens is not None else hidden[:, :-1]",
      "hidden = hidden, hidden[0] if call.cu_seqlens is not None else hidden[:, 1:]",
      T_GAPS, "-k", "family_transform and padded and cohere"),
    # -- Packed layout ---------------------------------------------------------------------------
    M("pack-ends-marked-at-starts", "dpo_kernels/batches.py",
      "last[cu[1:].long() - 1] = True", "last[cu[:-1].long()] = True",
      T_GAPS, "-k", "pack_labels or completions_at_every_boundary"),
    M("pack-mask-not-rolled", "dpo_kernels/batches.py",
      "mask = torch.roll(completion, -1) & ~last", "mask = completion & ~last",
      T_GAPS, "-k", "pack_labels"),
    M("pack-positions-not-restarted", "dpo_kernels/batches.py",
      "position = torch.arange(ids.numel(), device=ids.device) - starts",
      "position = torch.arange(ids.numel(), device=ids.device)",
      T_GAPS, "-k", "completions_at_every_boundary"),
    M("segment-count-shifted", "dpo_kernels/packed.py",
      "c = torch.nn.functional.pad(counted.long().cumsum(0), (1, 0))",
      "c = torch.nn.functional.pad(counted.long().cumsum(0), (0, 1))",
      T_GAPS, "-k", "first_and_last_tokens and reference"),
    M("cu-seqlens-read-under-compile", "dpo_kernels/validation.py",
      "    if values_unreadable(cu_seqlens):\n",
      "    if backend.device_side_checks(cu_seqlens.device):\n",
      "tests/test_packed.py", "-k", "compile"),
    M("cu-seqlens-decrease-allowed", "dpo_kernels/validation.py",
      "if cu[i] < cu[i - 1]), None)", "if cu[i] < cu[i - 1] - 1), None)",
      "tests/test_packed.py", "-k", "bad_cu_seqlens"),
    # -- Vocabulary-parallel path ----------------------------------------------------------------
    M("vocab-parallel-lse-unshifted", "dpo_kernels/vocab_parallel.py",
      "return top + torch.log(_all_reduce(torch.exp(lse_local - top), group))",
      "return torch.log(_all_reduce(torch.exp(lse_local - top), group))",
      VP2),
    M("vocab-parallel-offshard-grad", "dpo_kernels/vocab_parallel.py",
      "dz[b, t, a] = (-grad_tok[b, t].to(lse.dtype) * p).to(dz.dtype)",
      "dz[b, t, a] = (grad_tok[b, t].to(lse.dtype) * (1 - p)).to(dz.dtype)",
      VP2),
    M("vocab-parallel-labels-not-compared", "dpo_kernels/vocab_parallel.py",
      "if len({p[2].item() for p in parts}) > 1:", "if len({p[2].item() for p in parts}) > 2:",
      "tests/test_vocab_parallel.py", "-k", "refusals"),
    M("vocab-parallel-hidden-grad-not-reduced", "dpo_kernels/vocab_parallel.py",
      "dh = _all_reduce(dh, group).to(hidden.dtype)", "dh = dh.to(hidden.dtype)",
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
      'if "sft" not in self.loss_types:\n            counts = b.completion_mask.sum(1).chunk(2)',
      'if "sft" not in self.loss_types:\n            counts = b.attention_mask.sum(1).chunk(2)',
      T_PARITY, "-k", "ipo or sigmoid_norm"),
    M("trl-logits-metric-from-rejected", "dpo_kernels/integrations/trl.py",
      'metrics["logits/chosen"].append(ratio(c_mean[c_mask].sum(), c_mask.sum()))',
      'metrics["logits/chosen"].append(ratio(r_mean[r_mask].sum(), r_mask.sum()))',
      T_PARITY, "-k", "hinge"),
    # -- C++ kernels (each compiled into its own cache entry) ---------------------------------
    M("cpp-ignore-index-hardcoded", "csrc/logprobs.cpp",
      "if (y == ignore_index) return -1;", "if (y == -100) return -1;",
      T_GAPS, "-k", "logits_path_honours_ignore_index and cpu"),
    M("cpp-online-rescale-inverted", "csrc/vec_rows.h",
      "const A scale = std::exp(f.m - shift);\n    const VA vshift(shift);",
      "const A scale = std::exp(shift - f.m);\n    const VA vshift(shift);",
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
    M("cpp-projection-block-weights-of-first-block", "csrc/vocab_blocked_mm.cpp",
      "at::mm_out(o, h, w.narrow(0, start, nv).t());",
      "at::mm_out(o, h, w.narrow(0, b0 * block, nv).t());",
      T_LDPO, "-k", "projection_in_vocabulary_blocks"),
    M("deferred-dw-overwritten-when-full", "dpo_kernels/linear_dpo_chunks.py",
      "        if self.filled + n > self.dz.shape[0]:\n            self.flush()\n",
      "        if self.filled + n > self.dz.shape[0]:\n            self.filled = 0\n",
      T_CUDA_READY, "-k", "single_pass_on_cuda_route"),
    M("deferred-dw-last-flush-dropped", "dpo_kernels/linear_dpo_chunks.py",
      "    if deferred is not None:\n        deferred.flush()\n",
      "    if deferred is not None:\n        pass\n",
      T_CUDA_READY, "-k", "single_pass_on_cuda_route"),
    M("cuda-dw-added-to-fresh-memory", "dpo_kernels/linear_dpo_rows.py",
      "self._tl.addmm_acc(dw[vs : vs + nv], xd.T, h, fresh=dw_fresh)",
      "self._tl.addmm_acc(dw[vs : vs + nv], xd.T, h)",
      T_CUDA_READY, "-k", "single_pass_on_cuda_route"),
    M("fp16-factor-left-in-the-tiles", "dpo_kernels/ops/triton_linear_logprobs.py",
      "return factor if on_cuda and dtype == torch.float16 and factor != 0 else 1.0",
      "return 1.0",
      T_CUDA_READY, "-k", "transform_factor"),
    M("fp16-weight-grad-missing-the-factor", "dpo_kernels/linear_dpo_chunks.py",
      "            for t in (self.dw, self.db):\n", "            for t in (self.db,):\n",
      T_CUDA_READY, "-k", "dz_leaves_the_transform_factor"),
    M("fp16-dh-kept-in-fp16", "dpo_kernels/linear_dpo_chunks.py",
      "self.dh = torch.zeros(hidden.shape, dtype=acc,",
      "self.dh = torch.zeros(hidden.shape, dtype=hidden.dtype,",
      "tests/test_linear_dpo.py", "-k", "float16_gradients"),
    M("fp16-tiles-not-lifted", "dpo_kernels/linear_dpo_chunks.py",
      "        if rows.f16_tiles:\n            g = grads.lift(g)\n", "",
      T_CUDA_READY, "-k", "lifted"),
    M("fp16-cuda-single-pass", "dpo_kernels/linear_dpo_chunks.py",
      "if grad_on and (loss.coupled or rows.f16_tiles):", "if grad_on and loss.coupled:",
      T_CUDA_READY, "-k", "lifted"),
    M("scale-kernel-never-scales", "dpo_kernels/ops/triton_scale.py",
      "    if s != 1:  # NaN too", "    if s != s:",
      "tests/test_linear_dpo.py", "-k", "scale_kernel"),
    M("scale-kernel-one-block-per-program", "dpo_kernels/ops/triton_scale.py",
      "stride = tl.num_programs(0).to(tl.int64) * BLOCK", "stride = n + 0 * BLOCK",
      "tests/test_linear_dpo.py", "-k", "scale_kernel"),
    M("triton-cpo-empty-completion-divides-by-zero", "dpo_kernels/ops/triton_sibling_losses.py",
      "                na = tl.maximum(na, 1.0)\n", "",
      "tests/test_preference_losses.py", "-k", "without_tokens"),
    M("reference-log1mexp-both-branches-differentiated", "dpo_kernels/ops/reference_siblings.py",
      "torch.log1p(-torch.exp(torch.where(low, x, _LOG_HALF)))", "torch.log1p(-torch.exp(x))",
      "tests/test_preference_losses.py", "-k", "just_below_zero"),
    M("mask-values-not-checked", "dpo_kernels/validation.py",
      "            (mask != 0) & (mask != 1),\n", "            (mask != 0) & (mask != 0),\n",
      "tests/test_errors.py", "-k", "mask"),
    M("weighted-double-backward-unweighted", "dpo_kernels/dpo_loss_op.py",
      "mean = (per if weights is None else per * weights).mean()", "mean = per.mean()",
      "tests/test_edge_cases.py", "-k", "weighted_dpo_loss_double"),
    M("fused-gradients-double-backward-unguarded", "dpo_kernels/linear_dpo_chunks.py",
      "    if torch.is_grad_enabled():  # create_graph:", "    if False:  # create_graph:",
      "tests/test_edge_cases.py", "-k", "closed_form_double and linear_dpo"),
    M("hf-trainer-loss-taken-as-normalized", "dpo_kernels/integrations/hf.py",
      "        self.model_accepts_loss_kwargs = False\n", "",
      "tests/test_linear_dpo_trainers.py", "-k", "accumulation"),
    M("fused-ops-left-under-autocast", "dpo_kernels/linear_dpo_chunks.py",
      "    with no_autocast(hidden):\n        h, w, b = cast_to(",
      "    if True:\n        h, w, b = cast_to(",
      T_LIN, "-k", "autocast"),
    M("forward-mode-tangent-let-through", "dpo_kernels/validation.py",
      "if not torch.compiler.is_compiling() and forward_ad.unpack_dual(t).tangent is not None:",
      "if False:", "tests/test_edge_cases.py", "-k", "forward_mode"),
    M("negative-counts-let-through", "dpo_kernels/validation.py",
      "~(n >= minimum),  # NaN too", "~(n >= minimum - 10**9),",
      "tests/test_errors.py", "-k", "counts or orpo"),
    M("fused-head-reads-any-head", "dpo_kernels/fused_head.py",
      "and type(used).forward is torch.nn.Linear.forward)", "or True)",
      "tests/test_forward.py", "-k", "refuses"),
    M("hf-eval-metrics-logged-as-training", "dpo_kernels/integrations/hf.py",
      '        if "loss" in logs:\n', "        if True:\n",
      "tests/test_linear_dpo_trainers.py", "-k", "evaluate or own_log"),
    M("hf-eval-metrics-left-queued", "dpo_kernels/integrations/hf.py",
      "        self._dpo_metrics[\"eval\"].clear()\n        out = super()",
      "        out = super()", "tests/test_linear_dpo_trainers.py", "-k", "own_log"),
    M("fused-head-patches-the-compile-wrapper", "dpo_kernels/fused_head.py",
      '            inner = getattr(m, "_orig_mod", None)', "            inner = None",
      "tests/test_linear_dpo_trainers.py", "-k", "torch_compile"),
    M("orpo-log-odds-metric-over-beta", "dpo_kernels/preference_losses.py",
      '"log_odds_ratio": torch.nn.functional.logsigmoid(log_odds).mean(),',
      '"log_odds_ratio": -losses.mean() / beta,', "tests/test_trl_siblings.py", "-k",
      "orpo_matches"),
    M("fused-head-skips-accelerate-autocast", "dpo_kernels/fused_head.py",
      "    with _forward_autocast(self):", "    with contextlib.nullcontext():",
      "tests/test_trl.py", "-k", "reaches_the_backbone"),
    M("trl-metrics-forward-without-model-inputs", "dpo_kernels/integrations/trl.py",
      "attention_mask=b.attention_mask,\n                                   **kwargs)",
      "attention_mask=b.attention_mask)", "tests/test_trl_vision.py"),
    M("virtual-token-logits-kept", "dpo_kernels/forward.py",
      '_logits_of(out)[:, -kwargs["input_ids"].shape[1] :]',
      '_logits_of(out)[:, : kwargs["input_ids"].shape[1]]', "tests/test_trl.py", "-k",
      "prompt_learning"),
    M("fused-head-autocast-ignores-its-kwargs", "dpo_kernels/fused_head.py",
      "(ac.device, ac.fast_dtype, ac._enabled,", "(ac.device, ac.fast_dtype, True,",
      "tests/test_forward.py", "-k", "autocast"),
    M("fused-head-patch-assumed-in-place", "dpo_kernels/fused_head.py",
      "    if _installed(inner):", '    if "_dpo_kernels_autocast" in inner.__dict__:',
      "tests/test_forward.py", "-k", "unwrapping"),
    M("nonzero-static-half-size", "dpo_kernels/linear_dpo_chunks.py",
      "torch.nonzero_static(mask, size=mask.numel(),",
      "torch.nonzero_static(mask, size=mask.numel() // 2,",
      "tests/test_linear_dpo.py", "-k", "every_loss_type"),
    M("kto-logits-path-reference-first", "dpo_kernels/integrations/trl_kto.py",
      "policy_first = not fused", "policy_first = False",
      "tests/test_trl_siblings.py", "-k", "kto_peft"),
    M("per-pair-loss-shape-unchecked", "dpo_kernels/linear_dpo.py",
      "if not isinstance(out, torch.Tensor) or tuple(out.shape) != (k1 - k0,):",
      "if not isinstance(out, torch.Tensor):", "tests/test_errors.py"),
    M("dpo-beta-sign-refused", "dpo_kernels/losses.py",
      "    if not math.isfinite(beta):", "    if not math.isfinite(beta) or beta < 0:",
      T_LOSS, "-k", "options_trl_trains_with"),
    M("cpp-row-offset-in-int32", "csrc/logprobs.cpp",
      "const scalar_t* row = base + (r / T) * s_b + (r % T) * s_t;\n        st = row_stats",
      "const scalar_t* row = base + static_cast<int32_t>((r / T) * s_b + (r % T) * s_t);\n"
      "        st = row_stats",
      "tests/test_int64_offsets_cpu.py", "-k", "logprobs_rows"),
    M("cpp-strides-assumed-contiguous", "csrc/common.h",
      "return x.stride(-1) == 1 ? x : x.contiguous();", "return x;",
      T_GAPS, "-k", "vocabulary_stride and cpu"),
    M("triton-hinge-drops-nan", "dpo_kernels/ops/triton_dpo_loss.py",
      "loss += w * tl.maximum(1.0 - u, 0.0, propagate_nan=tl.PropagateNan.ALL)",
      "loss += w * tl.maximum(1.0 - u, 0.0)",
      "tests/test_edge_cases.py", "-k", "nan_sum_gives_nan and triton and options0"),
    M("triton-exo-one-minus-sigmoid", "dpo_kernels/ops/triton_dpo_loss.py",
      "ql = tl.sigmoid(-u)", "ql = 1.0 - qw",
      "tests/test_edge_cases.py", "-k", "exo_pair_gradient_at_large and triton"),
    M("triton-tanh-from-exp-only", "dpo_kernels/ops/triton_linear_logprobs.py",
      "return tl.where(small, p, t)", "return t",
      "tests/test_edge_cases.py", "-k", "softcap_much_larger and triton and dtype0"),
    M("reference-alphapo-exp-pow", "dpo_kernels/ops/reference_siblings.py",
      "c = -torch.expm1(-spec.alpha * c) / spec.alpha",
      "c = (1 - torch.exp(c).pow(-spec.alpha)) / spec.alpha",
      "tests/test_edge_cases.py", "-k", "alphapo_reward and reference"),
    M("kto-kl-in-input-dtype", "dpo_kernels/preference_losses.py",
      "acc = torch.promote_types(acc_dtype(kl_logps.dtype), acc_dtype(ref_kl_logps.dtype))",
      "acc = torch.promote_types(kl_logps.dtype, ref_kl_logps.dtype)",
      "tests/test_edge_cases.py", "-k", "kto_kl_estimate"),
    M("fused-head-one-forward-slot", "dpo_kernels/fused_head.py",
      "    slot = _free_slot(inner)", '    slot = "_dpo_kernels_forward"',
      "tests/test_model_lifecycle.py", "-k", "second_patch"),
    M("left-pad-first-token-scored", "dpo_kernels/forward.py",
      "& am[:, 1:] & (am.cumsum(1)[:, :-1] > 0)", "& am[:, 1:]",
      "tests/test_forward.py", "-k", "left_padded"),
    M("packing-probe-compares-a-row-with-itself", "dpo_kernels/forward.py",
      "if not torch.equal(out[2:4], out[6:8]):", "if not torch.equal(out[2:4], out[2:4]):",
      "tests/test_packed.py", "-k", "refuse"),
    M("collate-drops-reference-sums", "dpo_kernels/batches.py",
      "    if any(has):", "    if False:",
      "tests/test_hf_trainer_edges.py", "-k", "precomputed"),
    M("hf-trainer-drops-model-inputs", "dpo_kernels/integrations/hf.py",
      "model_kwargs=model_inputs(inputs),", "model_kwargs=None,",
      "tests/test_hf_trainer_edges.py", "-k", "model_inputs"),
    M("hf-trainer-ref-model-beside-sums", "dpo_kernels/integrations/hf.py",
      "if self.ref_model is not None and sums is not None:", "if False:",
      "tests/test_hf_trainer_edges.py", "-k", "precomputed"),
    M("collate-none-sum-counted", "dpo_kernels/batches.py",
      "has = [e.get(k) is not None for e", "has = [k in e for e",
      "tests/test_hf_trainer_edges.py", "-k", "precomputed"),
    M("chunk-tokens-in-row-order", "dpo_kernels/linear_dpo_chunks.py",
      "slots = torch.arange(B, device=dev).view(2, self.P).t().reshape(-1)",
      "slots = torch.arange(B, device=dev)",
      "tests/test_linear_dpo.py", "-k", "budget"),
    M("chunk-row-ids-without-side", "dpo_kernels/linear_dpo_chunks.py",
      "torch.add(self.pair[sl], self.side[sl], alpha=k1 - k0)",
      "torch.add(self.pair[sl], self.side[sl], alpha=0)",
      "tests/test_linear_dpo.py", "-k", "budget"),
    M("hidden-rows-at-the-view-stride", "dpo_kernels/linear_dpo_chunks.py",
      "self.src = row * (s0 // s1) + t", "self.src = row * T + t",
      "tests/test_linear_dpo.py", "-k", "strided or any_layout"),
    M("reduced-grads-cast-unscaled", "dpo_kernels/linear_dpo_chunks.py",
      "out.view(-1)[a : a + step] = flat[a : a + step] * s",
      "out.view(-1)[a : a + step] = flat[a : a + step]",
      "tests/test_linear_dpo.py", "-k", "float16_gradients"),
    M("rows-view-with-no-positions", "dpo_kernels/linear_dpo_chunks.py",
      "if T and s2 == 1 and s1 > 0", "if s2 == 1 and s1 > 0",
      "tests/test_linear_dpo.py", "-k", "no_positions"),
    M("backward-scale-first-block-only", "dpo_kernels/linear_dpo_chunks.py",
      "for a in range(0, flat.numel(), step):", "for a in range(0, min(flat.numel(), 1), step):",
      "tests/test_linear_dpo.py", "-k", "scale_in_blocks"),
    M("hf-no-default-collator", "dpo_kernels/integrations/hf.py",
      'if len(args) < 3 and kwargs.get("data_collator") is None:', "if False:",
      "tests/test_hf_trainer_edges.py", "-k", "default_collator"),
    M("hf-preference-columns-removed", "dpo_kernels/integrations/hf.py",
      "self._signature_columns += sorted(PREFERENCE_COLUMNS - set(self._signature_columns))",
      "self._signature_columns += []",
      "tests/test_hf_trainer_edges.py", "-k", "default_collator"),
    M("hf-default-collator-takes-halves-as-token-ids", "dpo_kernels/integrations/hf.py",
      'if examples and isinstance(examples[0], Mapping) and "prompt_ids" in examples[0]:',
      "if examples:", "tests/test_hf_trainer_edges.py", "-k", "default_collator"),
    M("meta-backward-reads-the-scale", "dpo_kernels/linear_dpo_chunks.py",
      "        or grad_loss.is_meta\n", "",
      "tests/test_linear_dpo.py", "-k", "meta_tensors"),
    M("vocab-parallel-dh-added-in-bf16", "dpo_kernels/vocab_parallel.py",
      "dh = _all_reduce(dh, group).to(hidden.dtype)",
      "dh = _all_reduce(dh.to(hidden.dtype), group)",
      "tests/test_vocab_parallel.py", "-k", "reduced"),
    M("vocab-parallel-dtypes-not-compared", "dpo_kernels/vocab_parallel.py",
      "torch.tensor(_digest(same), device=here)", "torch.tensor(0, device=here)",
      "tests/test_vocab_parallel.py", "-k", "refusals"),
    M("vocab-parallel-mask-values-checked-alone", "dpo_kernels/vocab_parallel.py",
      "    agree(group, lambda: check_values(labels, mask, ignore_index, vocab))",
      "    check_values(labels, mask, ignore_index, vocab)",
      "tests/test_vocab_parallel.py", "-k", "refusals"),
    M("vocab-parallel-digest-21-bit-positions", "dpo_kernels/vocab_parallel.py",
      "counted.numel(), device=counted.device) * 2**32 + ids",
      "counted.numel(), device=counted.device) * 2**21 + ids",
      "tests/test_vocab_parallel.py", "-k", "digest"),
    M("hf-trainer-takes-a-dpo-config", "dpo_kernels/integrations/hf.py",
      "if trl_config is not None:  # a DPOConfig", "if False:  # a DPOConfig",
      "tests/test_errors.py", "-k", "DPOLossTrainer"),
    M("fused-head-reads-gemma2-softcap-only", "dpo_kernels/fused_head.py",
      '_SOFTCAP_FIELDS = ("final_logit_softcapping", "logits_soft_cap", "output_logit_soft_cap")',
      '_SOFTCAP_FIELDS = ("final_logit_softcapping",)',
      "tests/test_gaps.py", "-k", "family_transform or unmapped"),
    M("kto-predictions-without-virtual-tokens", "dpo_kernels/integrations/_siblings.py",
      "Scored(seq, logits if with_mean else None, full)",
      "Scored(seq, logits if with_mean else None, logits)",
      "tests/test_trl_siblings.py", "-k", "prompt_learning_predictions"),
    M("fake-backward-keeps-input-strides", "dpo_kernels/linear_logprobs.py",
      "hidden.new_empty(hidden.shape) if hidden_grad else empty,",
      "torch.empty_like(hidden) if hidden_grad else empty,",
      "tests/test_linear_logprobs.py", "-k", "strided_inputs"),
    M("alphapo-cancelling-exp-torch", "dpo_kernels/ops/torch_sibling_losses.py",
      "xc, xr = -torch.expm1(tc) / spec.alpha, -torch.expm1(tr) / spec.alpha",
      "xc, xr = (1 - ec) / spec.alpha, (1 - er) / spec.alpha",
      "tests/test_preference_losses.py", "-k", "backends_match_spec and cpu"),
    M("alphapo-cancelling-exp-triton", "dpo_kernels/ops/triton_sibling_losses.py",
      "xc = -expm1(tc, ec) / alpha", "xc = (1.0 - ec) / alpha",
      "tests/test_preference_losses.py", "-k", "backends_match_spec and triton"),
    M("alphapo-reward-metric-cancels", "dpo_kernels/preference_losses.py",
      "rc, rr = -torch.expm1(-alpha * xc) / alpha, -torch.expm1(-alpha * xr) / alpha",
      "rc, rr = (1 - torch.exp(-alpha * xc)) / alpha, (1 - torch.exp(-alpha * xr)) / alpha",
      "tests/test_preference_losses.py", "-k", "backends_match_spec and cpu"),
    M("alpha-divergence-cancelling-exp-torch", "dpo_kernels/ops/torch_dpo_loss.py",
      "return torch.expm1(tc) / a1,", "return (torch.exp(tc) - 1) / a1,",
      T_LOSS, "-k", "near_one and cpu"),
    M("alpha-divergence-cancelling-exp-triton", "dpo_kernels/ops/triton_dpo_loss.py",
      "return expm1(tc, e) / a1,", "return (e - 1.0) / a1,",
      T_LOSS, "-k", "near_one and triton"),
    M("nan-token-counts-pass", "dpo_kernels/validation.py",
      "~(n >= minimum),  # NaN too", "n < minimum,",
      "tests/test_errors.py", "-k", "NaN token counts"),
    M("fused-head-inkling-mup-ignored", "dpo_kernels/fused_head.py",
      "        scale = (scale or 1.0) / mup", "        pass",
      "tests/test_gaps.py", "-k", "family_transform and inkling"),
    M("fused-head-unpadded-vs-config-vocab", "dpo_kernels/fused_head.py",
      'rows = _head_rows(head) or getattr(cfg, "vocab_size", None)',
      'rows = getattr(cfg, "vocab_size", None)',
      "tests/test_gaps.py", "-k", "family_transform and inkling2"),
    M("fused-head-rows-of-a-zero3-shard", "dpo_kernels/fused_head.py",
      'shape = getattr(w, "ds_shape", None) or (', "shape = None or (",
      "tests/test_gaps.py", "-k", "unmapped"),
    M("triton-every-row-dh-in-input-layout", "dpo_kernels/ops/triton_linear_logprobs.py",
      "dh = hidden.new_empty(hidden.shape, dtype=acc) if hidden_grad else empty",
      "dh = torch.empty_like(hidden, dtype=acc) if hidden_grad else empty",
      "tests/test_linear_logprobs.py", "-k", "strided_inputs and triton"),
    M("cpo-smoothing-zero-times-inf-reference", "dpo_kernels/ops/reference_siblings.py",
      "            if eps:  # eps = 0 adds nothing", "            if True:  # eps = 0 adds nothing",
      "tests/test_preference_losses.py", "-k", "infinite_margin and reference"),
    M("cpo-smoothing-zero-times-inf-torch", "dpo_kernels/ops/torch_sibling_losses.py",
      "            if eps:  # eps = 0 adds nothing", "            if True:  # eps = 0 adds nothing",
      "tests/test_preference_losses.py", "-k", "infinite_margin and cpu"),
    M("retained-graph-hands-out-saved-grads", "dpo_kernels/linear_dpo_chunks.py",
      "        or _keeps_graph()\n", "",
      "tests/test_linear_dpo.py", "-k", "retained_graph_through_views"),
    M("fused-head-skips-layers-before-the-head", "dpo_kernels/fused_head.py",
      "    if extra:\n", "    if False:\n",
      "tests/test_gaps.py", "-k", "transform_before_the_head"),
    M("fused-head-runs-base-model-as-is", "dpo_kernels/fused_head.py",
      "        out = _backbone(self)(*args, **kwargs)",
      "        out = self.base_model(*args, **kwargs)",
      "tests/test_gaps.py", "-k", "backbone_of_llama4"),
    M("packing-probe-misses-lookahead", "dpo_kernels/forward.py",
      "changed = torch.cat([x, x, (x + 1) % vocab, (x + 2) % vocab])[None]",
      "changed = packed",
      "tests/test_gaps.py", "-k", "not_causal"),
    M("packing-probe-expert-names-fixed", "dpo_kernels/forward.py",
      'if k.endswith("experts") and type(v) is int]',
      'if k in ("num_experts", "num_local_experts", "n_routed_experts")]',
      "tests/test_packed.py", "-k", "expert_count"),
    M("vlm-text-config-transform-always-applied", "dpo_kernels/fused_head.py",
      "    if cfg is not model.config:  # a composite", "    if False:  # a composite",
      "tests/test_gaps.py", "-k", "vision_language"),
    M("vlm-named-transform-dropped", "dpo_kernels/fused_head.py",
      "and name in _TRANSFORM_FIELDS and name not in self._source:",
      "and name in _TRANSFORM_FIELDS:",
      "tests/test_gaps.py", "-k", "vision_language"),
    M("git-image-positions-read-as-text", "dpo_kernels/fused_head.py",
      "if ids is not None and hidden.shape[-2] > ids.shape[-1]:", "if False:",
      "tests/test_gaps.py", "-k", "git_image"),
    M("chameleon-logit-mask-ignored", "dpo_kernels/fused_head.py",
      "in _MASKING_LOGITS:", "in ():",
      "tests/test_gaps.py", "-k", "chameleon"),
    M("logits-scaling-direction-from-text-config", "dpo_kernels/fused_head.py",
      'multiplies = getattr(model.config, "model_type", "")',
      'multiplies = getattr(cfg, "model_type", "")',
      "tests/test_gaps.py", "-k", "vision_language"),
    M("accuracy-counts-ties", "dpo_kernels/losses.py",
      '"rewards/accuracies": (chosen_rewards > rejected_rewards)',
      '"rewards/accuracies": (chosen_rewards >= rejected_rewards)',
      "tests/test_losses.py", "-k", "tie"),
    M("fused-dpo-route-drops-transform", "dpo_kernels/fused_head.py",
      "memory_budget=d.memory_budget, **transform,", "memory_budget=d.memory_budget,",
      "tests/test_trl_parity.py", "-k", "logit_transform"),
    M("fused-kto-route-drops-transform", "dpo_kernels/integrations/trl_kto.py",
      "**transform, **self._loss_options(), stats=True,", "**self._loss_options(), stats=True,",
      "tests/test_trl_siblings.py", "-k", "kto_matches_stock_with_a_logit_scale"),
    M("double-backward-counts-swapped", "dpo_kernels/dpo_loss_op.py",
      "per = reference.dpo_losses(a, b, rc.detach(), rr.detach(), nc, nr, ctx.spec)",
      "per = reference.dpo_losses(a, b, rc.detach(), rr.detach(), nr, nc, ctx.spec)",
      "tests/test_edge_cases.py", "-k", "double_backward_matches_float64"),
    M("pair-losses-unweighted", "dpo_kernels/losses.py",
      "per = per + w * value.detach()", "per = per + value.detach()",
      "tests/test_losses.py", "-k", "pair_weights_scale"),
    M("linear-dpo-ignores-given-counts", "dpo_kernels/linear_dpo.py",
      "nc = counts[:P] if chosen_counts is None else chosen_counts", "nc = counts[:P]",
      "tests/test_linear_dpo.py", "-k", "given_counts"),
    M("trainer-counts-scored-tokens", "dpo_kernels/integrations/trl.py",
      'if "sft" not in self.loss_types:', "if False:",
      "tests/test_trl_options.py", "-k", "no-prompt"),
    M("kto-kl-number-at-default-dtype", "dpo_kernels/preference_losses.py",
      "kl = torch.as_tensor(kl, dtype=acc, device=logps.device).detach().reshape(())",
      "kl = torch.as_tensor(kl, device=logps.device).detach().to(acc).reshape(())",
      "tests/test_global_modes.py", "-k", "kto_kl_number"),
    M("linear-kto-dry-run-float32", "dpo_kernels/linear_preference_losses.py",
      "zeros = hidden.new_zeros(N, dtype=compute_dtype or hidden.dtype)", "zeros = torch.zeros(N)",
      "tests/test_global_modes.py", "-k", "linear_kto_float64"),
    M("linear-orpo-dry-run-at-zero", "dpo_kernels/linear_preference_losses.py",
      "dry = torch.full((P,), -1.0, device=hidden.device)",
      "dry = torch.zeros(P, device=hidden.device)",
      "tests/test_global_modes.py", "-k", "detect_anomaly"),
    M("meta-tensors-not-refused", "dpo_kernels/validation.py",
      "    if _without_values(t):\n        raise NotImplementedError(",
      "    if False:\n        raise NotImplementedError(",
      "tests/test_global_modes.py", "-k", "refused_by_name"),
    M("router-loss-made-up", "dpo_kernels/fused_head.py",
      "    if func is None:\n        return None\n",
      "    if func is None:\n        from transformers.models.mixtral.modeling_mixtral import "
      "load_balancing_loss_func as func\n",
      "tests/test_moe_aux.py", "-k", "does_not_compute"),
    M("kto-precompute-by-trl-head", "dpo_kernels/integrations/trl_kto.py",
      "    def compute_ref_log_probs(self, model, inputs):",
      "    def _unused_compute_ref_log_probs(self, model, inputs):",
      "tests/test_trl_siblings.py", "-k", "precomputed_reference_is_scored"),
    M("router-loss-own-class-module-only", "dpo_kernels/fused_head.py",
      "for c in type(model).__mro__)", "for c in type(model).__mro__[:1])",
      "tests/test_moe_aux.py", "-k", "fsdp2"),
    M("fused-head-casts-before-the-ops", "dpo_kernels/fused_head.py",
      "            return fused_ops(h, weight, bias, tf)",
      "            return fused_ops(*(None if t is None else t.to(tf['compute_dtype'])\n"
      "                               for t in (h, weight, bias)), tf)",
      "tests/test_linear_logprobs.py", "-k", "autocast_keeps_float32"),
    M("logprobs-backward-recomputes-uncast", "dpo_kernels/linear_logprobs.py",
      "h, w, b = cast_to(compute_dtype, rows.hidden(hidden), weight, bias)\n        dh, dw, db",
      "h, w, b = rows.hidden(hidden), weight, bias\n        dh, dw, db",
      "tests/test_linear_logprobs.py", "-k", "compute_dtype_rounds"),
    # -- The benchmark's check -----------------------------------------------------------------
    M("bench-trl-sums-in-bf16", "dpo_kernels/bench/peers.py",
      "(selective_log_softmax(z, labels).float() * mask).sum(-1)",
      "(selective_log_softmax(z, labels) * mask).sum(-1)",
      "tests/test_bench_cli.py", "-k", "trl_selective_rows_sum_in_float32"),
    M("bench-own-objective-unchecked", "dpo_kernels/bench/cases.py",
      "if not torch.isfinite(objective).all():", "if False:",
      "tests/test_bench_cli.py", "-k", "own_objective_is_not_finite"),
    M("bench-nan-gradient-dropped", "dpo_kernels/bench/cases.py",
      "g_err = next((e for e in errs if not math.isfinite(e)), max(errs))", "g_err = max(errs)",
      "tests/test_bench_cli.py", "-k", "nan_in_a_later"),
    M("bench-incoming-gradient-uniform", "dpo_kernels/bench/cases.py",
      "values, objective = out, (out * self.grad_out).sum()", "values, objective = out, out.sum()",
      "tests/test_bench_cli.py", "-k", "off_by_a_little"),
    M("bench-timed-in-blocks", "dpo_kernels/bench/__init__.py",
      '            if device == "cuda":  # do_bench per method',
      '            if True:  # do_bench per method',
      "tests/test_bench_cli.py", "-k", "in_turns"),
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


# -- scratch copy and the C++ library cache ------------------------------------------------------

_SKIP = shutil.ignore_patterns(
    ".git", ".venv", "build", "__pycache__", "*.egg-info", ".pytest_cache", ".ruff_cache",
    ".benchmarks", ".hypothesis", "out", "*.so",
)  # fmt: skip


def make_scratch() -> str:
    scratch = tempfile.mkdtemp(prefix="dpo_mutants_")
    tree = os.path.join(scratch, "tree")
    shutil.copytree(ROOT, tree, ignore=_SKIP, symlinks=True)
    os.makedirs(os.path.join(scratch, "cache"))
    return tree


def env_for(tree: str) -> dict[str, str]:
    """The copy first on sys.path, and its own C++ cache next to it (see the module docstring)."""
    env = dict(os.environ, PYTHONPATH=tree + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env["DPO_KERNELS_CACHE_DIR"] = os.path.join(os.path.dirname(tree), "cache")
    return env


_ENTRY = "from dpo_kernels import _build; print(_build.entry_dir(_build.variant_for_this_cpu()))"


def seed_cache(tree: str) -> None:
    """Copies this machine's built library of the unmutated sources (if there is one, in the
    usual cache) into the copy's cache: the entry's name is a hash of the sources, not of paths."""
    env = {k: v for k, v in env_for(ROOT).items() if k != "DPO_KERNELS_CACHE_DIR"}
    out = subprocess.run([sys.executable, "-c", _ENTRY], cwd=ROOT, env=env, capture_output=True,
                         text=True)  # fmt: skip
    entry = out.stdout.strip()
    if out.returncode != 0 or not glob.glob(os.path.join(entry, "*.so")):
        return
    dest = os.path.join(env_for(tree)["DPO_KERNELS_CACHE_DIR"], os.path.basename(entry))
    shutil.copytree(entry, dest, ignore=shutil.ignore_patterns("lock", "FAILED", "build"))


def build_cpp(tree: str, timeout: float) -> tuple[bool, str]:
    """Compiles (or finds in the copy's cache) and loads csrc/ of `tree` for this CPU, as the
    package does on first CPU use. Returns (ok, the last line of the error)."""
    cmd = [sys.executable, "-m", "dpo_kernels", "build"]
    try:
        proc = subprocess.run(cmd, cwd=tree, env=env_for(tree), capture_output=True, text=True,
                              timeout=timeout)  # fmt: skip
    except subprocess.TimeoutExpired:
        return False, f"build over {timeout:.0f} s"
    if proc.returncode == 0:
        return True, ""
    errors = [ln for ln in proc.stdout.splitlines() + proc.stderr.splitlines() if "error:" in ln]
    return False, (errors or proc.stderr.strip().splitlines() or ["?"])[0][:300]


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
        seed_cache(tree)
        ok, err = build_cpp(tree, a.timeout)  # the unmutated library, for every Python mutant
        if not ok:
            print(f"the unmutated C++ kernels do not build or load here: {err}")
            return 2
        if a.baseline and applicable:
            files, exprs = baseline_selection(applicable)
            outcome, detail = run_pytest(tree, [*files, "-k", exprs], a.timeout * 3)
            print(f"baseline (unmutated, every selection at once): {outcome} {detail}", flush=True)
            if outcome != "pass":
                print("the selections fail without any mutant; fix that first")
                return 2
        killed = ran = 0
        survivors: list[str] = []
        unbuilt: list[str] = []
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
                    ok, err = build_cpp(tree, a.timeout)
                    if not ok:
                        unbuilt.append(m.name)
                        secs = time.time() - started
                        print(f"BUILD FAILED {m.name} ({secs:.0f} s): {err}", flush=True)
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
        print(f"time {time.time() - t0:.0f} s; survived: {', '.join(survivors) or 'none'}")
        if unbuilt:
            print(f"build failed (not counted): {', '.join(unbuilt)}")
        print(f"killed {killed} of {ran}")
        return 0 if killed == ran and not unbuilt else 1
    finally:
        if not a.keep:
            shutil.rmtree(os.path.dirname(tree), ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
