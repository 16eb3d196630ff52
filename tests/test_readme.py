"""The README's commands and example stay true."""

import pathlib
import re

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_ci_runs_the_readme_test_command():
    commands = re.search(r"```bash\n(.*?)```", README, re.S).group(1).strip().splitlines()
    assert len(commands) >= 2
    test_cmd = commands[1].split("#")[0].strip()
    assert test_cmd in (ROOT / ".ci" / "run").read_text()


def test_readme_example_runs_and_gives_the_naive_loss():
    code = re.search(r"```python\n(.*?)```", README, re.S).group(1)
    B, T, V = 2, 6, 50
    input_ids = torch.randint(0, V, (2 * B, T))
    loss_mask = torch.rand(2 * B, T) > 0.3
    logits = torch.randn(2 * B, T, V, requires_grad=True)
    ref_logits = torch.randn(2 * B, T, V)
    scope = dict(logits=logits, ref_logits=ref_logits, input_ids=input_ids, loss_mask=loss_mask)
    exec(code, scope)

    def sums(z):
        lp = z[:, :-1].log_softmax(-1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)
        return (lp * loss_mask[:, 1:]).sum(-1)

    p, r = sums(logits.detach()), sums(ref_logits)
    h = 0.1 * ((p[:B] - r[:B]) - (p[B:] - r[B:]))
    expect = -torch.nn.functional.logsigmoid(h).mean()
    torch.testing.assert_close(scope["loss"].detach(), expect, rtol=1e-5, atol=1e-6)
    assert logits.grad is not None and logits.grad[:, -1].abs().sum() == 0


def _blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README, re.S)


def _sums(logits, labels, mask):
    """Naive per-row sums of the label tokens' log-probs (float64)."""
    lp = logits.double().log_softmax(-1).gather(-1, labels[..., None]).squeeze(-1)
    return (lp * mask).sum(-1)


def _dpo(pc, pr, rc, rr, beta=0.1):
    return -torch.nn.functional.logsigmoid(beta * ((pc - rc) - (pr - rr))).mean()


def test_every_readme_python_block_runs_and_gives_the_naive_numbers():
    """Each ```python block of the README, run on the inputs its comments describe, against the
    naive computation (the first block has its own test above)."""
    import torch.nn.functional as F

    from dpo_kernels import collate_preferences
    from tests.conftest import preference_examples, tiny_causal_lm

    blocks = _blocks()
    assert len(blocks) == 6, "a README block was added or removed: test it here"
    torch.manual_seed(0)
    B, T, V, H = 3, 7, 50, 16
    ids = torch.randint(0, V, (2 * B, T))
    cm = torch.rand(2 * B, T) > 0.3
    cm[:, 1] = True  # every row counts a token

    # block 2: DPOLoss on the first block's `out`, then dpo_loss on the four sums (sigmoid + sft)
    logits, ref_logits = torch.randn(2 * B, T, V, requires_grad=True), torch.randn(2 * B, T, V)
    s = dict(logits=logits, ref_logits=ref_logits, input_ids=ids, loss_mask=cm)
    exec(blocks[0].replace("loss.backward()", ""), s)
    s.update(nc=cm[:B, 1:].sum(-1), nr=cm[B:, 1:].sum(-1))
    exec(blocks[1], s)
    p, r = _sums(logits, ids[:, 1:], cm[:, 1:]), _sums(ref_logits, ids[:, 1:], cm[:, 1:])
    sft = -p[:B].sum() / s["nc"].sum()  # TRL's "sft": the mean NLL over every chosen token
    expect = _dpo(p[:B], p[B:], r[:B], r[B:]) + 0.5 * sft
    torch.testing.assert_close(s["res"].loss.double(), expect, rtol=1e-5, atol=1e-6)
    assert logits.grad is not None and logits.grad.abs().sum() > 0

    # block 3: linear_dpo_loss against logits built in full
    hidden = torch.randn(2 * B, T, H, requires_grad=True)
    lm_head = torch.nn.Linear(H, V, bias=False)
    rc, rr = torch.randn(B), torch.randn(B)
    s = dict(hidden=hidden, lm_head=lm_head, input_ids=ids, completion_mask=cm, rc=rc, rr=rr)
    exec(blocks[2], s)
    h2 = hidden.detach().double().requires_grad_()
    p = _sums(h2[:, :-1] @ lm_head.weight.detach().double().T, ids[:, 1:], cm[:, 1:])
    expect = _dpo(p[:B], p[B:], rc.double(), rr.double())
    expect.backward()
    torch.testing.assert_close(s["res"].loss.double(), expect.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(hidden.grad.double(), h2.grad, rtol=1e-4, atol=1e-7)

    # block 4: concatenated_forward + DPOLoss against the models' own logits
    model, ref = tiny_causal_lm(), tiny_causal_lm(seed=1)
    batch = collate_preferences(preference_examples(B))
    s = dict(model=model, ref_model=ref, batch=batch)
    exec(blocks[3], s)
    lab, m = batch["input_ids"][:, 1:], batch["completion_mask"][:, 1:].bool()
    with torch.no_grad():
        ids_am = batch["input_ids"], batch["attention_mask"]
        pol = _sums(model(ids_am[0], attention_mask=ids_am[1]).logits[:, :-1], lab, m)
        rf = _sums(ref(ids_am[0], attention_mask=ids_am[1]).logits[:, :-1], lab, m)
    expect = _dpo(pol[:B], pol[B:], rf[:B], rf[B:])
    torch.testing.assert_close(s["res"].loss.detach().double(), expect, rtol=1e-5, atol=1e-6)

    # block 5: the sibling losses on sums; the last is KTO (TRL's formula, KL clamped at 0)
    lp, ref_lp, kl, ref_kl = (torch.randn(2 * B) for _ in range(4))
    labels = torch.arange(2 * B) % 2 == 0
    s = dict(pc=p[:B].float(), pr=p[B:].float(), nc=cm[:B].sum(-1), nr=cm[B:].sum(-1),
             nll=torch.tensor(1.5), logps=lp, ref_logps=ref_lp, labels=labels, kl=kl,
             ref_kl=ref_kl)  # fmt: skip
    exec(_each_result(blocks[4]), s)
    pc, pr, nc, nr = p[:B].detach(), p[B:].detach(), s["nc"].double(), s["nr"].double()
    _check_pair_losses(s, pc, pr, nc, nr, nll=1.5)
    z = (kl - ref_kl).mean().clamp(min=0)
    ratio = lp - ref_lp
    expect = torch.where(labels, 1 - F.sigmoid(0.1 * (ratio - z)), 1 - F.sigmoid(0.1 * (z - ratio)))
    torch.testing.assert_close(s["res_kto_loss"].loss, expect.mean(), rtol=1e-5, atol=1e-6)

    # block 6: the fused sibling losses; the last is linear_kto_loss, against logits in full
    weight = torch.randn(V, H, requires_grad=True)
    hid = torch.randn(2 * B, T, H, requires_grad=True)
    desirable, kl0 = labels, torch.tensor(0.1)
    s = dict(hidden=hid, weight=weight, labels=ids, mask=cm, ref_logps=ref_lp,
             desirable=desirable, kl=kl0)  # fmt: skip
    exec(_each_result(blocks[5]), s)
    w2 = weight.detach().double().requires_grad_()
    sums = _sums(hid.detach().double() @ w2.T, ids, cm)
    n = cm.sum(-1).double()
    nll = -sums[:B].sum() / n[:B].sum()  # ORPO's NLL: the chosen completion tokens' mean
    pc, pr = sums[:B].detach(), sums[B:].detach()
    _check_pair_losses(s, pc, pr, n[:B], n[B:], nll.detach(), prefix="linear_")
    ratio = sums - ref_lp.double()
    expect = torch.where(desirable, 1 - torch.sigmoid(0.1 * (ratio - 0.1)),
                         1 - torch.sigmoid(0.1 * (0.1 - ratio))).mean()  # fmt: skip
    expect.backward()
    torch.testing.assert_close(s["res_linear_kto_loss"].loss.double(), expect.detach(), rtol=1e-5,
                               atol=1e-6)  # fmt: skip
    torch.testing.assert_close(weight.grad.double(), w2.grad, rtol=1e-4, atol=1e-7)


def _each_result(block: str) -> str:
    """The block with each `res = f(...)` also kept apart as `res_f`."""
    return re.sub(r"^res = (\w+)\(", r"res = res_\1 = \1(", block, flags=re.M)


def _check_pair_losses(s, pc, pr, nc, nr, nll, prefix=""):
    """The CPO, SimPO and ORPO results of a README block against TRL's formulas in float64 (sums
    pc, pr of the chosen and rejected completions, their token counts nc, nr)."""
    import torch.nn.functional as F

    ac, ar = pc / nc, pr / nr
    cpo = -F.logsigmoid(0.1 * (pc - pr)).mean() + 1.0 * -(pc.sum() / nc.sum())
    simpo = -F.logsigmoid(2.0 * (ac - ar - 0.5 / 2.0)).mean()
    odds = (ac - ar) - (torch.log(-torch.expm1(ac)) - torch.log(-torch.expm1(ar)))
    orpo = nll - 0.1 * F.logsigmoid(odds).mean()
    for name, want in (("cpo_loss", cpo), ("simpo_loss", simpo), ("orpo_loss", orpo)):
        got = s[f"res_{prefix}{name}"].loss.detach().double()
        torch.testing.assert_close(got, torch.as_tensor(want, dtype=torch.float64), rtol=1e-5,
                                   atol=1e-6, msg=prefix + name)  # fmt: skip
