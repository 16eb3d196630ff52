"""Worker processes for tests/test_distributed.py (spawned; must be importable)."""

import contextlib
import os
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(__file__))

from conftest import preference_examples, tiny_causal_lm

from dpo_kernels import DPOLoss
from dpo_kernels.batches import collate_preferences
from dpo_kernels.forward import concatenated_forward

PAIRS = 8


def spawn_ranks(worker, world: int, tmp_path, *args) -> None:
    """Runs worker(rank, world, init_file, out_dir, *args) in `world` processes (gloo through a
    file in tmp_path, which also receives their results)."""
    mp.spawn(worker, args=(world, str(tmp_path / "init"), str(tmp_path), *args), nprocs=world)


def shutdown() -> None:
    """Leaves the process group and exits at once. A gloo worker that returns normally aborts in
    about 1 run in 10 here ("terminate called without an active exception", after
    destroy_process_group, during interpreter teardown; plain DDP on a transformers model without
    this package does the same), so the worker skips the teardown: its results are saved by now."""
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def dpo_step_loss(model, ref, examples, fused_lm_head=False):
    batch = collate_preferences(examples)
    out = concatenated_forward(model, batch, ref_model=ref, fused_lm_head=fused_lm_head)
    return DPOLoss(beta=0.1)(out.pairs()).loss


def ddp_worker(rank: int, world: int, init_file: str, out_dir: str, modes: list[str]) -> None:
    """Each of `modes` in turn, in one process group (one launch: a launch costs more than a
    mode here)."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    for mode in modes:
        _ddp_mode(rank, world, out_dir, mode)
    shutdown()


def _ddp_mode(rank: int, world: int, out_dir: str, mode: str) -> None:
    """One step's gradients of `mode`'s wrapper (rank 0 saves them), then 3 more steps, and
    whether every rank ends with the same parameters."""
    torch.manual_seed(0)
    model, ref = tiny_causal_lm(seed=0).train(), tiny_causal_lm(seed=1)
    examples = preference_examples(PAIRS, seed=3)
    share = PAIRS // world
    mine = examples[rank * share : (rank + 1) * share]
    fused = mode.endswith("fused_head")
    if mode.startswith("ddp"):
        find_unused = "find_unused" in mode  # what HF Trainer passes without gradient checkpointing
        wrapped = torch.nn.parallel.DistributedDataParallel(
            model, find_unused_parameters=find_unused
        )
    elif mode.startswith("fsdp1"):
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer

        policy = ModuleWrapPolicy({LlamaDecoderLayer})
        if "head_unit" in mode:  # lm_head as its own FSDP unit, outside the root's parameters
            from torch.distributed.fsdp.wrap import CustomPolicy

            head = model.lm_head
            policy = CustomPolicy(lambda m: isinstance(m, LlamaDecoderLayer) or m is head)
        wrapped = FSDP(model, auto_wrap_policy=policy, use_orig_params=True, device_id="cpu")
    else:
        from torch.distributed.fsdp import fully_shard

        for layer in model.model.layers:
            fully_shard(layer)
        wrapped = fully_shard(model)
    opt = torch.optim.AdamW(wrapped.parameters(), lr=1e-2)
    loss = dpo_step_loss(wrapped, ref, mine, fused)
    loss.backward()
    grads = {}

    def full():  # FSDP1: the whole parameters and gradients, on every rank, for the block
        if not mode.startswith("fsdp1"):
            return contextlib.nullcontext()
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        return FSDP.summon_full_params(wrapped, with_grads=True)

    with full():
        for n, p in wrapped.named_parameters():
            g = p.grad
            if hasattr(g, "full_tensor"):  # FSDP2: sharded DTensor gradients
                g = g.full_tensor()
            grads[n.replace("_fsdp_wrapped_module.", "").replace("module.", "")] = (
                g.detach().clone()
            )
    if rank == 0:
        torch.save(grads, os.path.join(out_dir, f"{mode}_grads.pt"))
    opt.step()
    for step in range(3):
        opt.zero_grad()
        batch = examples[((rank + step) % world) * share :][:share]
        dpo_step_loss(wrapped, ref, batch, fused).backward()
        opt.step()
    with full():
        flat = torch.cat([
            (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().flatten()
            for p in wrapped.parameters()
        ])  # fmt: skip
    gathered = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat)
    if rank == 0:
        same = all(torch.equal(gathered[0], g) for g in gathered[1:])
        torch.save({"same": same}, os.path.join(out_dir, f"{mode}_params.pt"))


def vocab_parallel_case(V=37, seed=11):
    """Logits [3, 5, V], labels hitting every rank's slice boundaries, ignore_index, a mask."""
    g = torch.Generator(torch.get_default_device()).manual_seed(seed)
    logits = torch.randn(3, 5, V, generator=g) * 3
    labels = torch.randint(0, V, (3, 5), generator=g)
    labels[0, 0] = -100
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[2, 4] = False
    return logits, labels, mask


def vocab_slices(V: int, world: int) -> list[tuple[int, int]]:
    sizes = [len(c) for c in torch.arange(V).tensor_split(world)]
    starts = [sum(sizes[:i]) for i in range(world)]
    return [(s, s + n) for s, n in zip(starts, sizes, strict=True)]


def vocab_parallel_worker(rank: int, world: int, init_file: str, out_dir: str, backends) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    from dpo_kernels import sequence_logprobs

    logits, labels, mask = vocab_parallel_case()
    slices = vocab_slices(logits.shape[-1], world)
    # Labels on the first and last id of every rank's slice.
    flat = labels.view(-1)
    for i, (a, b) in enumerate(slices):
        flat[1 + 2 * i], flat[2 + 2 * i] = a, b - 1
    start, end = slices[rank]
    w = torch.linspace(-1, 1, labels.shape[0])
    results = {}
    for backend in backends:
        z = logits[..., start:end].clone().requires_grad_()
        out = sequence_logprobs(
            z, labels, mask=mask, vocab_group=dist.group.WORLD, vocab_start=start, backend=backend
        )
        (out.logps * w).sum().backward()
        results[backend] = (out.logps.detach(), z.grad, labels.clone())
    torch.save(results, os.path.join(out_dir, f"vp_rank{rank}.pt"))
    shutdown()


def linear_vocab_parallel_case(V=37, H=8, seed=12):
    """hidden [2, 5, H], an LM head [V, H] with bias, labels on every slice boundary, a mask."""
    g = torch.Generator(torch.get_default_device()).manual_seed(seed)
    hidden = torch.randn(2, 5, H, generator=g, dtype=torch.float64)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64)
    bias = torch.randn(V, generator=g, dtype=torch.float64)
    labels = torch.randint(0, V, (2, 5), generator=g)
    labels[1, 4] = -100
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[0, 4] = False
    return hidden, weight, bias, labels, mask


def boundary_labels(labels: torch.Tensor, slices) -> torch.Tensor:
    flat = labels.clone().view(-1)
    for i, (a, b) in enumerate(slices):
        flat[2 * i], flat[2 * i + 1] = a, b - 1
    return flat.view(labels.shape)


def linear_vocab_parallel_worker(rank, world, init_file, out_dir, backends,
                                 compute_dtype=None) -> None:  # fmt: skip
    """The head split over the ranks; with compute_dtype, a float32 head whose matmuls take it
    (the gradients of hidden, this rank's rows and bias then float32, not rounded to it)."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    from dpo_kernels import linear_sequence_logprobs

    hidden, weight, bias, labels, mask = linear_vocab_parallel_case()
    if compute_dtype is not None:
        hidden, weight, bias = hidden.float(), weight.float(), bias.float()
    slices = vocab_slices(weight.shape[0], world)
    labels = boundary_labels(labels, slices)
    start, end = slices[rank]
    results = {}
    for backend in backends:
        h = hidden.clone().requires_grad_()
        w = weight[start:end].clone().requires_grad_()
        b = bias[start:end].clone().requires_grad_()
        out = linear_sequence_logprobs(
            h, w, labels, bias=b, mask=mask, softcap=3.0, vocab_group=dist.group.WORLD,
            vocab_start=start, compute_dtype=compute_dtype, backend=backend,
        )  # fmt: skip
        (out.logps * torch.tensor([0.7, -1.3], dtype=out.logps.dtype)).sum().backward()
        results[backend] = (out.logps.detach(), h.grad, w.grad, b.grad, labels)
    name = "lvp" if compute_dtype is None else "cdt"
    torch.save(results, os.path.join(out_dir, f"{name}_rank{rank}.pt"))
    shutdown()


def reduced_dh_vocab_parallel_worker(rank, world, init_file, out_dir, backends) -> None:
    """bf16 and fp16 hidden gradients of a head split over 2 ranks whose rows share a common
    direction (as trained LM heads' do): the ranks' partial dh are large and mostly cancel."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    from dpo_kernels import linear_sequence_logprobs

    hidden, weight, labels = anisotropic_head_case()
    start, end = [(0, 3), (3, weight.shape[0])][rank]
    results = {}
    for backend in backends:
        for dtype in (torch.bfloat16, torch.float16):
            h = hidden.to(dtype).requires_grad_()
            out = linear_sequence_logprobs(h, weight[start:end].to(dtype), labels,
                                           vocab_group=dist.group.WORLD, vocab_start=start,
                                           backend=backend)  # fmt: skip
            out.logps.sum().backward()
            results[backend, str(dtype)] = h.grad
    torch.save(results, os.path.join(out_dir, f"rdh_rank{rank}.pt"))
    shutdown()


def anisotropic_head_case():
    """hidden [3, 5, 8], a head [7, 8] of rows close to one common direction, labels [3, 5]."""
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 5, 8, generator=g)
    weight = 0.05 * torch.randn(7, 8, generator=g) + 4 * torch.randn(8, generator=g)
    return hidden, weight, torch.randint(0, 7, (3, 5), generator=g)


def hf_trainer_worker(rank: int, world: int, init_file: str, out_dir: str, port: int) -> None:
    """DPOLossTrainer under accelerate DDP (the environment `accelerate launch` sets): 2 SGD
    steps of 2 pairs per process, then evaluate(); saves what was logged and what each process
    computed on its own pairs."""
    import json

    import datasets
    from transformers import TrainingArguments

    import dpo_kernels.integrations.hf as hf

    env = {"RANK": rank, "LOCAL_RANK": rank, "WORLD_SIZE": world, "MASTER_PORT": port}
    os.environ.update({k: str(v) for k, v in env.items()}, MASTER_ADDR="127.0.0.1")
    local = []
    computed = hf.concatenated_dpo_loss

    def spy(*args, **kwargs):
        res, out = computed(*args, **kwargs)
        local.append({k: v.item() for k, v in res.metrics.items()})
        return res, out

    hf.concatenated_dpo_loss = spy
    data = datasets.Dataset.from_list(preference_examples(8, seed=3))
    args = TrainingArguments(
        output_dir=os.path.join(out_dir, f"run{rank}"), per_device_train_batch_size=2,
        per_device_eval_batch_size=2, max_steps=2, logging_steps=1, learning_rate=0.5,
        optim="sgd", report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True,
        remove_unused_columns=False, ddp_find_unused_parameters=False,
    )  # fmt: skip
    trainer = hf.DPOLossTrainer(
        model=tiny_causal_lm(seed=0), ref_model=tiny_causal_lm(seed=1), args=args,
        train_dataset=data, data_collator=collate_preferences,
    )  # fmt: skip
    trainer.train()
    evaluation = trainer.evaluate(data)
    logs = [h for h in trainer.state.log_history if "loss" in h]
    result = {"logs": logs, "eval": evaluation, "local": local, "world": trainer.args.world_size}
    with open(os.path.join(out_dir, f"hf_rank{rank}.json"), "w") as f:
        json.dump(result, f)
    shutdown()


def vocab_parallel_refusals_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    """What the vocabulary-parallel ops refuse, on 2 ranks: slices that overlap or leave a gap
    (every rank raises), labels or a mask that differ between the ranks (every rank raises),
    an argument only one rank gets wrong (every rank raises at once, none
    left waiting: a 60 s group timeout fails a regression fast) and a double backward. Saves
    each case's (exception type, message) per rank."""
    import datetime
    import json

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=60))  # fmt: skip
    from dpo_kernels import linear_sequence_logprobs, sequence_logprobs

    group = dist.group.WORLD
    logits, labels, mask = vocab_parallel_case(V=8)
    hidden = torch.randn(3, 5, 4)
    weight = torch.randn(8, 4)

    def logits_call(start, size, vocab_start=None, double=False, y=labels, m=mask):
        z = logits[..., start : start + size].clone().requires_grad_()
        first = start if vocab_start is None else vocab_start
        out = sequence_logprobs(z, y, mask=m, vocab_group=group, vocab_start=first)
        if double:
            (g,) = torch.autograd.grad(out.logps.sum(), z, create_graph=True)
            g.pow(2).sum().backward()

    def linear_call(start, size, double=False, y=labels):
        h = hidden.clone().requires_grad_()
        w = weight[start : start + size].clone().requires_grad_()
        out = linear_sequence_logprobs(h, w, y, mask=mask, vocab_group=group,
                                       vocab_start=start)  # fmt: skip
        if double:
            (g,) = torch.autograd.grad(out.logps.sum(), h, create_graph=True)
            g.pow(2).sum().backward()

    half = [(0, 4), (4, 4)][rank]
    bad_mask = mask.long()  # rank 0: a 2 where rank 1 has a 1 (the same tokens count)
    if rank == 0:
        bad_mask[tuple(mask.nonzero()[0].tolist())] = 2
    solo = dist.new_group([0])  # rank 1 is not a member

    def solo_call():
        z = logits.clone().requires_grad_()
        sequence_logprobs(z, labels, mask=mask, vocab_group=solo, vocab_start=0)

    # rank 1: one counted label changed; a mask that counts one more token
    other = labels.clone()
    at = tuple((mask & (labels != -100)).nonzero()[0].tolist())
    other[at] = (labels[at] + 1) % 8
    more = mask.clone()
    more[tuple((~mask).nonzero()[0].tolist())] = True
    cases = {
        "overlap": lambda: logits_call(*[(0, 4), (3, 4)][rank]),
        "gap": lambda: logits_call(*[(0, 4), (5, 3)][rank]),
        "one_rank_bad_start": lambda: logits_call(*half, vocab_start=[0, -1][rank]),
        "one_rank_empty_slice": lambda: linear_call(*[(0, 8), (8, 0)][rank]),
        "one_rank_other_labels": lambda: logits_call(*half, y=[labels, other][rank]),
        "one_rank_other_labels_linear": lambda: linear_call(*half, y=[labels, other][rank]),
        "one_rank_other_mask": lambda: logits_call(*half, m=[mask, more][rank]),
        "one_rank_bad_mask_value": lambda: logits_call(*half, m=bad_mask),
        "one_rank_other_dtype": lambda: sequence_logprobs(
            logits[..., slice(*[(0, 4), (4, 8)][rank])].to([torch.float64, torch.float32][rank]),
            labels,
            mask=mask,
            vocab_group=group,
            vocab_start=half[0],
        ),
        "one_rank_other_softcap_linear": lambda: linear_sequence_logprobs(
            hidden,
            weight[half[0] : half[0] + 4],
            labels,
            mask=mask,
            vocab_group=group,
            vocab_start=half[0],
            softcap=[2.0, None][rank],
        ),
        "one_rank_other_hidden_size": lambda: linear_sequence_logprobs(
            torch.randn(3, 5, 4 + rank),
            torch.randn(4, 4 + rank),
            labels,
            mask=mask,
            vocab_group=group,
            vocab_start=half[0],
        ),
        "not_a_member": solo_call,
        "double_backward_logits": lambda: logits_call(*half, double=True),
        "double_backward_linear": lambda: linear_call(*half, double=True),
    }
    results = {}
    for name, call in cases.items():
        try:
            call()
            results[name] = None
        except Exception as e:  # (the test asserts which)
            results[name] = [type(e).__name__, str(e)]
    with open(os.path.join(out_dir, f"vpr_rank{rank}.json"), "w") as f:
        json.dump(results, f)
    shutdown()
