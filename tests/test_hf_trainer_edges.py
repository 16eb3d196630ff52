"""DPOLossTrainer (the plain HF Trainer) against a hand-written PyTorch DPO loop: gradient
accumulation, evaluation metrics, precomputed reference sums through collate_preferences, model
inputs riding in the batch, and the LM head shapes the fused head must handle (a bias, tied
embeddings). Uneven micro-batches weigh as in TRL (README: the HF Trainer), not checked here."""

import copy

import pytest
import torch
import torch.nn.functional as F

datasets = pytest.importorskip("datasets")
transformers = pytest.importorskip("transformers")

from conftest import TRAINER_DEVICE, preference_examples, tiny_causal_lm  # noqa: E402

from dpo_kernels import DPOLoss  # noqa: E402
from dpo_kernels.batches import collate_preferences, preference_batch  # noqa: E402
from dpo_kernels.integrations.hf import DPOLossTrainer  # noqa: E402

BETA = 0.2


# -- the plain PyTorch reference: one unpadded forward per sequence ------------------------------


def _seq_logp(model, prompt, completion):
    ids = torch.tensor([prompt + completion])
    logits = model(input_ids=ids, use_cache=False).logits[0, :-1].float()
    lp = logits.log_softmax(-1).gather(-1, ids[0, 1:, None])[:, 0]
    return lp[max(len(prompt), 1) - 1 :].sum()  # the completion's tokens, each from the one before


def _pair_logps(model, ex):
    pc = torch.stack([_seq_logp(model, e["prompt_ids"], e["chosen_ids"]) for e in ex])
    pr = torch.stack([_seq_logp(model, e["prompt_ids"], e["rejected_ids"]) for e in ex])
    return pc, pr


def _plain(model, ref, ex):
    """(per-pair sigmoid DPO losses [P], the logged metrics) of the plain formula."""
    pc, pr = _pair_logps(model, ex)
    with torch.no_grad():
        rc, rr = _pair_logps(ref, ex)
    cr, rj = BETA * (pc - rc).detach(), BETA * (pr - rr).detach()
    metrics = {"rewards/chosen": cr.mean(), "rewards/rejected": rj.mean(),
               "rewards/accuracies": (cr > rj).float().mean(), "rewards/margins": (cr - rj).mean(),
               "logps/chosen": pc.detach().mean(),
               "logps/rejected": pr.detach().mean()}  # fmt: skip
    return -F.logsigmoid(BETA * ((pc - rc) - (pr - rr))), {k: v.item() for k, v in metrics.items()}


def _args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), **TRAINER_DEVICE, report_to=[],
                remove_unused_columns=False, logging_steps=1, optim="sgd", learning_rate=0.5,
                save_strategy="no", seed=0, disable_tqdm=True, max_grad_norm=0.0,
                lr_scheduler_type="constant")  # fmt: skip
    return transformers.TrainingArguments(**(base | kw))


def _in_order(trainer):
    """The training batches in dataset order (no shuffling), as the plain loop takes them."""
    trainer._get_train_sampler = lambda *a, **k: torch.utils.data.SequentialSampler(
        trainer.train_dataset
    )
    return trainer


def _train(tmp_path, ex, **kw):
    model = tiny_causal_lm()
    trainer = _in_order(DPOLossTrainer(
        model=model, ref_model=tiny_causal_lm(seed=1), loss=DPOLoss(beta=BETA),
        args=_args(tmp_path, num_train_epochs=1, **kw),
        train_dataset=datasets.Dataset.from_list(ex), data_collator=collate_preferences,
    ))  # fmt: skip
    trainer.train()
    return model, [h for h in trainer.state.log_history if "loss" in h]


# -- defects ----------------------------------------------------------------------------------


@pytest.mark.parametrize("clip", [0.0, 0.05], ids=["no-clip", "clip"])
def test_accumulation_trains_as_one_batch(clip, tmp_path):
    """4 pairs in micro-batches of 2 (gradient_accumulation_steps=2) make the update of one
    batch of 4: the plain loop's mean over the pairs, its gradient norm (clipped) and its
    metrics."""
    ex = preference_examples(4)
    one, (one_log,) = _train(tmp_path, ex, per_device_train_batch_size=4, max_grad_norm=clip)
    acc, (acc_log,) = _train(tmp_path, ex, per_device_train_batch_size=2,
                             gradient_accumulation_steps=2, max_grad_norm=clip)  # fmt: skip
    plain = tiny_causal_lm()
    per, metrics = _plain(plain.train(), tiny_causal_lm(seed=1), ex)
    per.mean().backward()
    norm = torch.nn.utils.get_total_norm([p.grad for p in plain.parameters()]).item()
    if clip:
        torch.nn.utils.clip_grad_norm_(plain.parameters(), clip)
    with torch.no_grad():
        for p in plain.parameters():
            p -= 0.5 * p.grad
    for log in (one_log, acc_log):
        assert log["loss"] == pytest.approx(per.mean().item(), rel=1e-5)
        assert log["grad_norm"] == pytest.approx(norm, rel=1e-4)
        for k, v in metrics.items():
            assert log[k] == pytest.approx(v, rel=1e-5, abs=1e-6), k
    want = dict(plain.named_parameters())
    for model in (one, acc):
        for n, p in model.named_parameters():
            torch.testing.assert_close(p, want[n], rtol=1e-5, atol=1e-6, msg=n)


def test_evaluate_metrics_are_the_plain_formulas(tmp_path):
    """evaluate() and predict() on 4 pairs in one eval batch or two: eval_loss and every
    eval_rewards/* and eval_logps/* metric are the means over the pairs (the plain formula,
    no gradient); eval_accumulation_steps and prediction_loss_only change nothing."""
    ex = preference_examples(4)
    model, ref = tiny_causal_lm(), tiny_causal_lm(seed=1)
    with torch.no_grad():
        per, want = _plain(model, ref, ex)
    want["loss"] = per.mean().item()
    ds = datasets.Dataset.from_list(ex)
    for kw in (dict(per_device_eval_batch_size=4), dict(per_device_eval_batch_size=2),
               dict(per_device_eval_batch_size=2, eval_accumulation_steps=1,
                    prediction_loss_only=True)):  # fmt: skip
        trainer = DPOLossTrainer(model=model, ref_model=ref, loss=DPOLoss(beta=BETA),
                                 args=_args(tmp_path, **kw), eval_dataset=ds,
                                 data_collator=collate_preferences)  # fmt: skip
        got, test = trainer.evaluate(), trainer.predict(ds)
        assert test.predictions is None and test.label_ids is None
        for k, v in want.items():
            assert got[f"eval_{k}"] == pytest.approx(v, rel=1e-5, abs=1e-6), (kw, k)
            assert test.metrics[f"test_{k}"] == pytest.approx(v, rel=1e-5, abs=1e-6), (kw, k)
    assert not any(p.grad is not None for p in model.parameters())


def test_precomputed_reference_sums_in_the_rows_reach_the_loss(tmp_path):
    """Rows carrying ref_chosen_logps / ref_rejected_logps (precomputed, TRL's names), collated by
    collate_preferences, with no ref_model: the loss of that reference, as with the ref_model
    (before: collate_preferences dropped them and the trainer trained reference-free)."""
    ex = preference_examples(4)
    model, ref = tiny_causal_lm(), tiny_causal_lm(seed=1)
    with torch.no_grad():
        rc, rr = _pair_logps(ref, ex)
    pre = [e | {"ref_chosen_logps": c.item(), "ref_rejected_logps": r.item()}
           for e, c, r in zip(ex, rc, rr, strict=True)]  # fmt: skip
    batch = collate_preferences(pre)
    torch.testing.assert_close(batch["ref_chosen_logps"], rc)
    torch.testing.assert_close(batch["ref_rejected_logps"], rr)
    with torch.no_grad():
        want = _plain(model, ref, ex)[0].mean()
    for fused in (True, False):
        trainer = DPOLossTrainer(
            model=model,
            loss=DPOLoss(beta=BETA),
            args=_args(tmp_path),
            data_collator=collate_preferences,
            fused_lm_head=fused,
        )
        with torch.no_grad():
            got = trainer.compute_loss(model, batch)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    with pytest.raises(KeyError, match="precompute both"):
        collate_preferences([pre[0], ex[1]])
    # a datasets.Dataset fills the missing sums with None: the same refusal
    with pytest.raises(KeyError, match="precompute both"):
        collate_preferences(list(datasets.Dataset.from_list([pre[0], ex[1]])))
    # with a ref_model too, which reference to use is ambiguous (TRL: the sums only when told)
    trainer = DPOLossTrainer(model=model, ref_model=ref, args=_args(tmp_path))
    with pytest.raises(ValueError, match="drop ref_model to use the batch's sums"):
        trainer.compute_loss(model, batch)


def _left_padded_with_positions(examples):
    """collate_preferences' rows moved to the right end, with the position_ids that restart them
    at 0 (what an absolute-position model needs for left-padded rows)."""
    b = collate_preferences(examples)
    length = b["input_ids"].shape[1]
    out = {k: torch.zeros_like(v) for k, v in b.items()}
    for i, n in enumerate(b["attention_mask"].sum(1).tolist()):
        for k, v in b.items():
            out[k][i, length - n :] = v[i, :n]
    out["position_ids"] = (out["attention_mask"].cumsum(1) - 1).clamp(min=0)
    return out


@pytest.mark.parametrize("fused", [True, False], ids=["fused-head", "logits"])
def test_model_inputs_in_the_batch_reach_both_forwards(fused, tmp_path):
    """A batch's other model inputs (here position_ids, on GPT-2's absolute positions) go to the
    policy's and the reference's forwards, as FusedDPOTrainer passes them: left-padded rows with
    their position_ids score as the unpadded rows. Before: dropped without a word (1e-2 off)."""
    ex = preference_examples(4)
    model, ref = tiny_causal_lm("gpt2"), tiny_causal_lm("gpt2", seed=1)
    with torch.no_grad():
        want = _plain(model, ref, ex)[0].mean()
    trainer = DPOLossTrainer(model=model, ref_model=ref, loss=DPOLoss(beta=BETA),
                             args=_args(tmp_path), fused_lm_head=fused)  # fmt: skip
    with torch.no_grad():
        got = trainer.compute_loss(model, _left_padded_with_positions(ex))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_other_inputs_with_separate_halves_are_refused(tmp_path):
    """Separate chosen_/rejected_ halves have no concatenated rows for another per-token input
    to line up with: a ValueError naming the key, not a forward that ignores it."""
    b = collate_preferences(preference_examples(2))
    halves = {f"{h}_{k}": b[k][s] for h, s in (("chosen", slice(0, 2)), ("rejected", slice(2, 4)))
              for k in ("input_ids", "attention_mask", "completion_mask")}  # fmt: skip
    trainer = DPOLossTrainer(model=tiny_causal_lm(), args=_args(tmp_path))
    trainer.compute_loss(trainer.model, halves)  # the halves alone train
    prompts = {
        "prompt_input_ids": b["input_ids"][:2, :2],
        "prompt_attention_mask": b["attention_mask"][:2, :2],
    }
    trainer.compute_loss(trainer.model, halves | prompts)  # (DPODataCollatorWithPadding's prompt_*)
    trainer.compute_loss(trainer.model, preference_batch(halves))  # a normalized batch
    with pytest.raises(ValueError, match="position_ids"):
        trainer.compute_loss(trainer.model, halves | {"position_ids": b["attention_mask"][:2]})


def _halves(ex, pad=0):
    """The examples as separate chosen_/rejected_ halves, every row padded to one length."""
    rows = [(e["prompt_ids"], e[k]) for e in ex for k in ("chosen_ids", "rejected_ids")]
    L = max(len(p) + len(c) for p, c in rows)
    out = []
    for e in ex:
        row = {}
        for half in ("chosen", "rejected"):
            p, c = e["prompt_ids"], e[f"{half}_ids"]
            n = len(p) + len(c)
            row[f"{half}_input_ids"] = p + c + [pad] * (L - n)
            row[f"{half}_attention_mask"] = [1] * n + [0] * (L - n)
            row[f"{half}_completion_mask"] = [0] * len(p) + [1] * len(c) + [0] * (L - n)
        out.append(row)
    return out


@pytest.mark.parametrize("layout", ["token_ids", "halves"])
def test_default_collator_and_columns(layout, tmp_path):
    """No data_collator and the TrainingArguments' default remove_unused_columns=True (the
    Trainer's own collator, and its dropping of every column the model's forward does not name,
    failed with torch's 'expected sequence of length' or 'No columns in the dataset match'):
    token-id examples are collated by collate_preferences, examples already laid out as padded
    halves by the Trainer's default collator, and one step of 4 pairs trains as the plain loop."""
    ex = preference_examples(4)
    rows = ex if layout == "token_ids" else _halves(ex)
    model = tiny_causal_lm()
    args = _args(tmp_path, per_device_train_batch_size=4, max_steps=1)
    args.remove_unused_columns = True
    trainer = DPOLossTrainer(model=model, ref_model=tiny_causal_lm(seed=1),
                             loss=DPOLoss(beta=BETA), args=args,
                             train_dataset=datasets.Dataset.from_list(rows))  # fmt: skip
    _in_order(trainer).train()
    (log,) = [h for h in trainer.state.log_history if "loss" in h]
    plain = tiny_causal_lm()
    per, metrics = _plain(plain.train(), tiny_causal_lm(seed=1), ex)
    per.mean().backward()
    assert log["loss"] == pytest.approx(per.mean().item(), rel=1e-5)
    for k, v in metrics.items():
        assert log[k] == pytest.approx(v, rel=1e-5, abs=1e-6), k
    with torch.no_grad():
        for (n, p), q in zip(model.named_parameters(), plain.parameters(), strict=True):
            torch.testing.assert_close(p, q - 0.5 * q.grad, rtol=1e-5, atol=1e-6, msg=n)


def test_default_collator_pads_with_the_tokenizers_pad_or_eos():
    """The default collator's pad id: the processing class's pad token, else its eos token (a
    Llama tokenizer has none), else 0."""
    from types import SimpleNamespace

    from dpo_kernels.integrations.hf import _pad_token_id

    assert _pad_token_id(SimpleNamespace(pad_token_id=7, eos_token_id=2)) == 7
    assert _pad_token_id(SimpleNamespace(pad_token_id=None, eos_token_id=2)) == 2
    assert _pad_token_id(SimpleNamespace(tokenizer=SimpleNamespace(pad_token_id=4))) == 4
    assert _pad_token_id(None) == 0


# -- coverage: behaviour that is right today --------------------------------------------------


def _tied_llama():
    model = tiny_causal_lm(tie=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    return model


def _biased_head_llama():
    model = tiny_causal_lm()
    head = torch.nn.Linear(32, 97, bias=True)
    with torch.no_grad():
        head.weight.copy_(model.lm_head.weight)
        head.bias.normal_(0, 0.5)
    model.lm_head = head
    return model


@pytest.mark.parametrize("make", [_tied_llama, _biased_head_llama], ids=["tied", "head-bias"])
def test_fused_head_and_logits_path_equal_the_plain_loop(make, tmp_path):
    """The loss and every parameter gradient (the tied weight's from both its uses; the head's
    bias) of DPOLossTrainer's fused head and logits path equal the plain loop's, float32."""
    ex = preference_examples(4)
    plain, ref = make(), make()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.01 * torch.randn_like(p))
    want = _plain(plain, ref, ex)[0].mean()
    want.backward()
    for fused in (True, False):
        model = copy.deepcopy(plain)
        model.zero_grad()
        trainer = DPOLossTrainer(model=model, ref_model=ref, loss=DPOLoss(beta=BETA),
                                 args=_args(tmp_path), fused_lm_head=fused)  # fmt: skip
        got = trainer.compute_loss(model, collate_preferences(ex))
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        got.backward()
        grads = dict(plain.named_parameters())
        for n, p in model.named_parameters():
            torch.testing.assert_close(p.grad, grads[n].grad, rtol=1e-4, atol=1e-6, msg=(fused, n))


def test_gradient_checkpointing_and_clipping_train_as_the_plain_loop(tmp_path):
    """Two SGD steps with gradient_checkpointing and max_grad_norm clipping, 2 micro-batches of 1
    pair each: the plain loop's losses and parameters (batch of 2, clipped)."""
    ex = preference_examples(4)
    model, logs = _train(tmp_path, ex, per_device_train_batch_size=1,
                         gradient_accumulation_steps=2, max_grad_norm=0.05,
                         gradient_checkpointing=True, max_steps=2)  # fmt: skip
    plain, ref = tiny_causal_lm().train(), tiny_causal_lm(seed=1)
    opt = torch.optim.SGD(plain.parameters(), lr=0.5)
    for step in range(2):
        loss = _plain(plain, ref, ex[2 * step : 2 * step + 2])[0].mean()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(plain.parameters(), 0.05)
        opt.step()
        assert logs[step]["loss"] == pytest.approx(loss.item(), rel=1e-5)
    want = dict(plain.named_parameters())
    for n, p in model.named_parameters():
        torch.testing.assert_close(p, want[n], rtol=1e-5, atol=1e-6, msg=n)
