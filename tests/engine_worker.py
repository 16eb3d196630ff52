"""One rank of a two-process run for tests/test_engines.py: stock `trl.DPOTrainer` and
`FusedDPOTrainer` (or, with a configuration's "trainer": "cpo" / "orpo" / "kto", the sibling
trainers, for tests/test_trl_siblings.py) trained from the same seed and data under one
distributed engine, for several configurations in one launch; each rank writes its comparison
to OUT_DIR/rank{RANK}.json.

    RANK=r WORLD_SIZE=2 MASTER_ADDR=.. MASTER_PORT=.. \
        python tests/engine_worker.py ENGINE OUT_DIR CONFIGS_JSON

ENGINE: "ddp" and "deepspeed" go through accelerate as `accelerate launch` would (the Trainer
reads the distributed environment). "fsdp1" / "fsdp2": accelerate 1.15 enables FSDP only on
accelerator devices, so the worker joins the gloo group itself, hides the distributed environment
from accelerate (which then leaves the model alone), gives each rank its own half of the data,
and shards the policy and the reference with torch's `FullyShardedDataParallel` / `fully_shard`
after the trainer is built (TRL patches the model first, as under accelerate) and before training.
"""

import json
import os
import sys
import traceback

os.environ.setdefault("DS_ACCELERATOR", "cpu")
sys.path.insert(0, os.path.dirname(__file__))

import torch
import torch.distributed as dist

ENGINE, OUT_DIR, CONFIGS = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
RANK, WORLD = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
if ENGINE.startswith("fsdp"):
    dist.init_process_group("gloo", rank=RANK, world_size=WORLD)
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        os.environ.pop(k)

if ENGINE == "deepspeed":
    # accelerate 1.15 brings DeepSpeed's process group up only on accelerator devices (on CPU it
    # picks no backend, so its state says 1 process while DeepSpeed then runs 2). Let it choose
    # gloo as it does for multi-CPU runs; everything else (DeepSpeed engines, hooks, ZeRO
    # partitioning, gradient reduction) is DeepSpeed's own CPU path.
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    _choose = PartialState._prepare_backend

    def _gloo_backend(self, cpu=False, sagemaker_dp=False, backend=None):
        b, kind = _choose(self, cpu, sagemaker_dp, backend)
        return ("gloo", DistributedType.MULTI_CPU) if kind == DistributedType.NO else (b, kind)

    PartialState._prepare_backend = _gloo_backend

import datasets  # noqa: E402
import transformers  # noqa: E402
import trl  # noqa: E402
from test_trl import preference_dataset, tiny_tokenizer  # noqa: E402

from dpo_kernels.integrations.trl import FusedDPOTrainer  # noqa: E402


def trainers(cfg) -> tuple[type, type, type]:
    """(stock, fused, config class) for cfg["trainer"]: "dpo" (default) or a sibling, "cpo",
    "orpo" or "kto"."""
    kind = cfg.get("trainer", "dpo")
    if kind == "dpo":
        return trl.DPOTrainer, FusedDPOTrainer, trl.DPOConfig
    from trl.experimental.cpo import CPOConfig, CPOTrainer
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    from dpo_kernels.integrations.trl_siblings import (
        FusedCPOTrainer,
        FusedKTOTrainer,
        FusedORPOTrainer,
    )

    if kind == "kto":
        return trl.KTOTrainer, FusedKTOTrainer, trl.KTOConfig
    if kind == "cpo":
        return CPOTrainer, FusedCPOTrainer, CPOConfig
    return ORPOTrainer, FusedORPOTrainer, ORPOConfig


def unpaired(data):
    """KTO's rows from a preference dataset: every chosen desirable, every rejected not."""
    rows = [
        {"prompt": r["prompt"], "completion": r[half], "label": half == "chosen"}
        for r in data.to_list()
        for half in ("chosen", "rejected")
    ]
    return datasets.Dataset.from_list(rows)


STEPS, BATCH = 4, 2
# Logged keys that are not training numbers.
SKIP = {"epoch", "learning_rate", "step"}


def tiny_llama(tied: bool, seed: int):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=28, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        tie_word_embeddings=tied,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(cfg)


def deepspeed_config(cfg) -> dict:
    zero = {"stage": cfg["zero"]}
    if cfg.get("offload"):
        zero["offload_param"] = {"device": "cpu"}
    return {
        "train_micro_batch_size_per_gpu": BATCH,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 1.0,
        "zero_optimization": zero,
    }


def shard(trainer, cfg) -> None:
    """FSDP1 / FSDP2 through torch, on the policy and the reference (each decoder layer a unit;
    "head_unit": lm_head too, FSDP2). "mp": mixed precision, bf16 compute, float32 reduction."""
    from dpo_kernels.fused_head import unwrap_model

    layer = transformers.models.llama.modeling_llama.LlamaDecoderLayer
    ref = getattr(trainer, "ref_model", None)  # ORPO has none
    bf16 = torch.bfloat16
    if ENGINE == "fsdp2":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        kw = {"mp_policy": MixedPrecisionPolicy(bf16, torch.float32)} if cfg.get("mp") else {}
        for m in [trainer.model] + ([ref] if ref is not None else []):
            for mod in list(m.modules()):
                if isinstance(mod, layer):
                    fully_shard(mod, **kw)
            if cfg.get("head_unit"):
                fully_shard(unwrap_model(m).lm_head, **kw)
            fully_shard(m, **kw)
        return
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp import MixedPrecision, ShardingStrategy
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    def wrap(m):
        mp = MixedPrecision(param_dtype=bf16, reduce_dtype=torch.float32) if cfg.get("mp") else None
        return FSDP(
            m, auto_wrap_policy=ModuleWrapPolicy({layer}), use_orig_params=cfg["orig"],
            sharding_strategy=ShardingStrategy[cfg["strategy"]], device_id=torch.device("cpu"),
            mixed_precision=mp,
        )  # fmt: skip

    trainer.model = trainer.model_wrapped = wrap(trainer.model)
    if ref is not None:
        trainer.ref_model = wrap(ref)


def full_params(trainer) -> dict[str, torch.Tensor]:
    """Every parameter of the trained policy, whole, on every rank."""
    import contextlib

    model, ctx = trainer.model, contextlib.nullcontext()
    if ENGINE == "deepspeed" and trainer.args.deepspeed and trainer.is_deepspeed_enabled:
        import deepspeed

        model = trainer.accelerator.unwrap_model(trainer.model_wrapped)
        if any(hasattr(p, "ds_id") for p in model.parameters()):
            ctx = deepspeed.zero.GatheredParameters(list(model.parameters()))
    if ENGINE == "fsdp1":
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        ctx = FSDP.summon_full_params(model)
    out = {}
    with ctx:
        for n, p in model.named_parameters():
            t = p.full_tensor() if hasattr(p, "full_tensor") else p
            for junk in ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "module."):
                n = n.replace(junk, "")
            out[n] = t.detach().clone().float()
    return out


def facts(trainer) -> dict:
    """What the run really used, read back from the trained objects (checked by the test)."""
    from dpo_kernels.fused_head import unwrap_model

    wrapped = trainer.model_wrapped
    inner = unwrap_model(trainer.model)
    out = {
        "gc": bool(getattr(inner, "is_gradient_checkpointing", False)),
        "lora": any("lora_" in n for n, _ in trainer.model.named_parameters()),
        "wrapper": type(wrapped).__name__,
        "find_unused": getattr(wrapped, "find_unused_parameters", None),
        "mixed_precision": trainer.accelerator.mixed_precision,
    }
    if ENGINE == "deepspeed":
        out["zero"] = wrapped.zero_optimization_stage()
        out["offload"] = bool(wrapped.zero_offload_param())
    return out


def train(cls, cfg):
    datasets.disable_caching()
    peft = cfg.get("peft", False)
    model = tiny_llama(cfg.get("tied", False), seed=0)
    dpo = cfg.get("trainer", "dpo") == "dpo"
    kto = cfg.get("trainer") == "kto"
    # "ref_copy": the reference is the policy's copy, so that the first step's margins are 0
    ref_seed = 0 if cfg.get("ref_copy") else 1
    ref = None if peft or not (dpo or kto) else tiny_llama(cfg.get("tied", False), seed=ref_seed)
    gc = cfg.get("gc")
    args = trainers(cfg)[2](
        output_dir=os.path.join(OUT_DIR, f"run{RANK}"),
        per_device_train_batch_size=BATCH,
        max_steps=STEPS,
        logging_steps=1,
        learning_rate=cfg.get("lr", 0.5),
        optim=cfg.get("optim", "sgd"),
        report_to=[],
        save_strategy="no",
        seed=0,
        dataloader_num_workers=0,
        bf16=cfg.get("bf16", False),  # on CPU: accelerate's bf16 autocast, float32 params
        disable_tqdm=True,
        use_cpu=ENGINE != "deepspeed",
        gradient_checkpointing=gc is not None,
        gradient_checkpointing_kwargs={"use_reentrant": gc == "reentrant"} if gc else None,
        ddp_find_unused_parameters=cfg.get("find_unused"),
        deepspeed=deepspeed_config(cfg) if ENGINE == "deepspeed" else None,
        # FSDP driven outside accelerate: its norm would be one rank's shard; do not clip by it.
        max_grad_norm=0.0 if ENGINE.startswith("fsdp") else 1.0,
        **cfg.get("options", {}),  # further fields of the trainer's config
    )
    data = preference_dataset(BATCH * STEPS * WORLD, seed=0, length=cfg.get("completion"))
    if kto:
        data = unpaired(data)
    if ENGINE.startswith("fsdp"):  # no distributed sampler: each rank takes its own half
        data = data.shard(WORLD, RANK, contiguous=True)
    kwargs = {"ref_model": ref} if dpo or kto else {}
    if peft:
        from peft import LoraConfig

        kwargs["peft_config"] = LoraConfig(
            r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0,
            modules_to_save=cfg.get("modules_to_save"),
            # random B: the adapter moves the policy off its reference from the first step (at
            # B = 0 the rewards tie exactly, and stock's bf16 rounding noise breaks the ties)
            init_lora_weights=not cfg.get("lora_random", False),
        )  # fmt: skip
    if cls is FusedDPOTrainer and cfg.get("fused_lm_head") is False:
        kwargs["fused_lm_head"] = False
    trainer = cls(
        model=model, args=args, train_dataset=data,
        processing_class=tiny_tokenizer(), **kwargs,
    )  # fmt: skip
    if ENGINE.startswith("fsdp"):
        shard(trainer, cfg)
    trainer.train()
    history = [
        {k: v for k, v in h.items() if k not in SKIP}
        for h in trainer.state.log_history
        if "loss" in h
    ]
    params = full_params(trainer)
    params["__facts__"] = facts(trainer)
    if ENGINE == "deepspeed":
        trainer.accelerator.free_memory()
    return history, params


def compare(stock, ours) -> dict:
    (hs, ps), (ho, po) = stock, ours
    if len(hs) != len(ho) or len(hs) != STEPS:
        return {"error": f"{len(hs)} stock steps logged, {len(ho)} ours; expected {STEPS}"}
    worst, keys = {}, set()
    for s, o in zip(hs, ho, strict=True):
        if s.keys() != o.keys():
            return {"error": f"logged keys differ: {sorted(s.keys() ^ o.keys())}"}
        keys |= s.keys()
        for k in s:
            rel = abs(o[k] - s[k]) / max(1.0, abs(s[k]))  # absolute below 1, relative above
            worst[k] = max(worst.get(k, 0.0), rel)
    fs, fo = ps.pop("__facts__"), po.pop("__facts__")
    if fs != fo:
        return {"error": f"the runs differ in setup: stock {fs}, ours {fo}"}
    if ps.keys() != po.keys():
        return {"error": f"parameter names differ: {sorted(ps.keys() ^ po.keys())[:5]}"}
    moved = [(ps[n] - p0).abs().max().item() for n, p0 in INITIAL.items() if n in ps]
    return {
        "metrics": worst,
        "max_metric_dev": max(worst.values()),
        "max_param_dev": max((ps[n] - po[n]).abs().max().item() for n in ps),
        "param_moved": max(
            moved, default=None
        ),  # training changed the policy: the comparison is not vacuous
        "loss_moved": abs(hs[0]["logps/chosen"] - hs[-1]["logps/chosen"]),
        "first_losses": [hs[0]["loss"], ho[0]["loss"]],
        "keys": sorted(keys),
        "facts": fs,
    }


INITIAL: dict[str, torch.Tensor] = {}
results = {}
for cfg in CONFIGS:
    name = cfg["name"]
    try:
        INITIAL.clear()
        INITIAL.update(
            {
                n: p.detach().clone()
                for n, p in tiny_llama(cfg.get("tied", False), 0).named_parameters()
            }
        )
        runs = {}
        # "baseline": "logits": against FusedDPOTrainer(fused_lm_head=False), where stock is off
        pair = trainers(cfg)[:2]
        if cfg.get("baseline") == "logits":
            pair = [(pair[1], {"fused_lm_head": False}), (pair[1], {})]
        else:
            pair = [(c, {}) for c in pair]
        for i, (cls, extra) in enumerate(pair):
            try:
                runs[i] = train(cls, {**cfg, **extra})
            except Exception:
                error = traceback.format_exc()[-3000:]
                results[name] = {"error": f"{cls.__name__} {extra}: {error}"}
                raise
        results[name] = compare(*runs.values())
    except Exception:
        results.setdefault(name, {"error": traceback.format_exc()[-3000:]})
    print(f"[rank {RANK}] {name}: {json.dumps(results[name])[:300]}", flush=True)
with open(os.path.join(OUT_DIR, f"rank{RANK}.json"), "w") as f:
    json.dump(results, f)
if dist.is_initialized():
    dist.barrier()
sys.stdout.flush()
sys.stderr.flush()
os._exit(0)  # see dist_worker.shutdown: gloo teardown aborts now and then
