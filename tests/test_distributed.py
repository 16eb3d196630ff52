"""The fused loss and forward under torch.distributed (gloo, 2 processes on this machine),
gradient accumulation, a compiled training step, and the absence of torch.func."""

import pathlib

import pytest
import torch
from conftest import preference_examples, tiny_causal_lm
from dist_worker import PAIRS, ddp_worker, dpo_step_loss, hf_trainer_worker, spawn_ranks

import dpo_kernels


def single_process_grads():
    model, ref = tiny_causal_lm(seed=0).train(), tiny_causal_lm(seed=1)
    dpo_step_loss(model, ref, preference_examples(PAIRS, seed=3)).backward()
    return {n: p.grad for n, p in model.named_parameters()}


# ddp_find_unused_fused_head and fsdp1_fused_head: issue #12 (they crashed when the fused head read
# lm_head.weight after the model's forward had returned).
MODES = [
    "ddp", "fsdp", "ddp_fused_head", "fsdp_fused_head", "ddp_find_unused_fused_head",
    "fsdp1_fused_head", "fsdp1_head_unit_fused_head",
]  # fmt: skip


@pytest.fixture(scope="module")
def modes_run(tmp_path_factory):
    """Every mode in one 2-process launch; the folder of their results."""
    out = tmp_path_factory.mktemp("modes")
    spawn_ranks(ddp_worker, 2, out, MODES)
    return out


@pytest.mark.parametrize("mode", MODES)
def test_two_process_gradients_equal_single_process(mode, modes_run):
    tmp_path = modes_run
    dist_grads = torch.load(tmp_path / f"{mode}_grads.pt")
    expect = single_process_grads()
    assert dist_grads.keys() == expect.keys()
    for n, g in expect.items():
        torch.testing.assert_close(dist_grads[n], g, rtol=1e-5, atol=1e-7, msg=n)
    assert torch.load(tmp_path / f"{mode}_params.pt")["same"], "ranks diverged"


def test_dpo_loss_trainer_logs_metrics_over_every_process(tmp_path):
    """DPOLossTrainer under accelerate DDP (2 processes): each logged DPO metric, in training and
    in evaluate(), is the mean over the processes of what each computed on its own pairs (as the
    Trainer logs its loss), the same on every process; before, each logged its own."""
    import json
    import socket

    pytest.importorskip("datasets")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    spawn_ranks(hf_trainer_worker, 2, tmp_path, port)
    runs = [json.load(open(tmp_path / f"hf_rank{r}.json")) for r in range(2)]
    assert [r["world"] for r in runs] == [2, 2]
    keys = ["rewards/margins", "rewards/chosen", "logps/chosen", "rewards/accuracies"]
    train_local = [r["local"][:2] for r in runs]  # the 2 training steps, then evaluation
    for step in range(2):
        a, b = (r["logs"][step] for r in runs)
        for k in keys:
            mean = (train_local[0][step][k] + train_local[1][step][k]) / 2
            assert a[k] == pytest.approx(mean, abs=1e-6) and b[k] == pytest.approx(mean, abs=1e-6)
        assert train_local[0][step]["rewards/margins"] != train_local[1][step]["rewards/margins"]
    a, b = (r["eval"] for r in runs)
    for k in keys:
        assert a[f"eval_{k}"] == pytest.approx(b[f"eval_{k}"], abs=1e-6), k
        evals = [sum(x[k] for x in r["local"][2:]) / len(r["local"][2:]) for r in runs]
        assert a[f"eval_{k}"] == pytest.approx(sum(evals) / 2, abs=1e-6), k


def test_gradient_accumulation_equals_one_batch():
    examples = preference_examples(8, seed=5)
    ref = tiny_causal_lm(seed=1)
    full = tiny_causal_lm(seed=0)
    dpo_step_loss(full, ref, examples).backward()
    acc = tiny_causal_lm(seed=0)
    for i in range(4):  # the loss is a mean over pairs: average the micro-batch losses
        (dpo_step_loss(acc, ref, examples[2 * i : 2 * i + 2]) / 4).backward()
    for (n, a), (_, b) in zip(full.named_parameters(), acc.named_parameters(), strict=True):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-7, msg=n)


def test_cpu_training_step_is_bitwise_deterministic():
    def run():
        model = tiny_causal_lm(seed=0).train()
        dpo_step_loss(model, tiny_causal_lm(seed=1), preference_examples(6, seed=2)).backward()
        return [p.grad.clone() for p in model.parameters()]

    for a, b in zip(run(), run(), strict=True):
        assert torch.equal(a, b)


def test_compiled_training_step_matches_eager():
    from dpo_kernels.batches import collate_preferences
    from dpo_kernels.forward import concatenated_forward

    batch = collate_preferences(preference_examples(4, seed=7))
    assert (batch["completion_mask"] == 0).any()  # masked (prompt and pad) tokens are present
    loss_fn = dpo_kernels.DPOLoss(beta=0.1, loss_type=["sigmoid", "ipo"])
    ref = tiny_causal_lm(seed=1)
    ref_out = concatenated_forward(ref, batch)
    ref_logps = ref_out.policy.logps.detach().chunk(2)

    def step(model):
        out = concatenated_forward(model, batch, ref_logps=ref_logps)
        return loss_fn(out.pairs()).loss

    eager_model, comp_model = tiny_causal_lm(seed=0), tiny_causal_lm(seed=0)
    torch._dynamo.reset()
    compiled = torch.compile(step)
    e, c = step(eager_model), compiled(comp_model)
    e.backward()
    c.backward()
    torch.testing.assert_close(c, e, rtol=1e-5, atol=1e-6)
    for (n, a), (_, b) in zip(
        eager_model.named_parameters(), comp_model.named_parameters(), strict=True
    ):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-6, msg=n)


def test_no_torch_func_transforms_in_the_package():
    # torch.func transforms inside a DDP forward silently skip gradient synchronization.
    root = pathlib.Path(dpo_kernels.__file__).parent
    for path in root.rglob("*.py"):
        text = path.read_text()
        assert "torch.func" not in text and "functorch" not in text, path
