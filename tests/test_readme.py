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
