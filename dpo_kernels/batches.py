"""The preference-batch layout: TRL's concatenated [chosen; rejected] rows or separate halves
normalized to one right-padded `PreferenceBatch`, token-id examples collated into it, and its
padding-free packing (`PackedBatch`) for the packed forward."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from .validation import check_mask_values, check_same_device


class PreferenceBatch(NamedTuple):
    """A concatenated preference batch: rows [chosen (P); rejected (P)], right-padded to L."""

    input_ids: torch.Tensor  # [2P, L]
    attention_mask: torch.Tensor  # [2P, L]
    completion_mask: torch.Tensor  # [2P, L] 1 on completion tokens (the ones scored)
    ref_chosen_logps: torch.Tensor | None  # [P] precomputed, if the batch carries them
    ref_rejected_logps: torch.Tensor | None


def _pad_right(x: torch.Tensor, length: int, value: int) -> torch.Tensor:
    return F.pad(x, (0, length - x.shape[1]), value=value)


def _completion(batch: Mapping[str, Any], prefix: str, ignore_index: int) -> torch.Tensor:
    if f"{prefix}completion_mask" in batch:
        return batch[f"{prefix}completion_mask"]
    if f"{prefix}labels" in batch:
        return batch[f"{prefix}labels"] != ignore_index
    raise KeyError(
        f"the batch has no {prefix}completion_mask or {prefix}labels to say which tokens to score"
    )


def _check_masks(ids: torch.Tensor, am, cm, prefix: str) -> None:
    """The masks of `ids` (one half, or the whole batch): tensors of its shape holding 0 and 1
    only (`check_mask_values`), on its device."""
    for name, m in ((f"{prefix}attention_mask", am), (f"{prefix}completion_mask", cm)):
        if not isinstance(m, torch.Tensor) or m.is_complex():
            got = m.dtype if isinstance(m, torch.Tensor) else type(m).__name__
            raise TypeError(f"{name} must be a 0/1 (or bool) tensor, got {got}")
        if m.shape != ids.shape:
            raise ValueError(
                f"{name} {tuple(m.shape)} must have the shape of {prefix}input_ids "
                f"{tuple(ids.shape)}"
            )
        check_same_device(name, m, ids, f"{prefix}input_ids")
        check_mask_values(name, m)


# Entries of a preference batch that lay out its rows (or carry reference sums), not model inputs
_LAYOUT = ("input_ids", "attention_mask", "completion_mask", "labels")
_HALVES = tuple(f"{part}_{k}" for part in ("prompt", "chosen", "rejected") for k in _LAYOUT)
_NOT_MODEL_INPUTS = frozenset((*_LAYOUT, *_HALVES, "ref_chosen_logps", "ref_rejected_logps"))
# ... and with the token-id examples' keys (`collate_preferences`): the columns of a preference
# dataset a Trainer's remove_unused_columns must keep
PREFERENCE_COLUMNS = _NOT_MODEL_INPUTS | {"prompt_ids", "chosen_ids", "rejected_ids"}


def model_inputs(batch: Mapping[str, Any]) -> dict[str, Any]:
    """The batch's other entries (position_ids, token_type_ids, pixel_values, ...): inputs of the
    policy's and the reference's forwards, rows [chosen; rejected] as input_ids'. Separate
    chosen_/rejected_ halves have no such rows: other entries beside them are refused."""
    if isinstance(batch, PreferenceBatch):  # (normalized already: no other entries)
        return {}
    extra = {k: v for k, v in batch.items() if k not in _NOT_MODEL_INPUTS}
    if extra and "input_ids" not in batch:
        raise ValueError(
            f"the preference batch has separate chosen_/rejected_ halves and other entries "
            f"{sorted(extra)}, which cannot be lined up with its concatenated rows; collate the "
            "batch as input_ids [chosen; rejected] (TRL's DataCollatorForPreference, "
            "collate_preferences) with them, or drop them"
        )
    return extra


def preference_batch(
    batch: Mapping[str, Any], pad_token_id: int = 0, ignore_index: int = -100
) -> PreferenceBatch:
    """Normalize a preference batch (TRL collator output or separate halves) to one layout."""
    if isinstance(batch, PreferenceBatch):
        return batch
    if "input_ids" in batch:
        ids = batch["input_ids"]
        if ids.dim() != 2 or ids.shape[0] % 2:
            raise ValueError(
                f"input_ids must be [2 * pairs, length] with rows [chosen; rejected], got "
                f"shape {tuple(ids.shape)}"
            )
        am = batch.get("attention_mask", torch.ones_like(ids))
        cm = _completion(batch, "", ignore_index)
    elif "chosen_input_ids" in batch and "rejected_input_ids" in batch:
        c_ids, r_ids = batch["chosen_input_ids"], batch["rejected_input_ids"]
        for name, x in (("chosen_input_ids", c_ids), ("rejected_input_ids", r_ids)):
            if x.dim() != 2:
                raise ValueError(
                    f"{name} must be [pairs, length], got shape {tuple(x.shape)}; for one pair "
                    f"pass {name}[None]"
                )
        if c_ids.shape[0] != r_ids.shape[0]:
            raise ValueError(
                f"chosen_input_ids has {c_ids.shape[0]} rows but rejected_input_ids has "
                f"{r_ids.shape[0]}; every prompt needs one chosen and one rejected completion"
            )
        L = max(c_ids.shape[1], r_ids.shape[1])
        halves = []
        for prefix, x in (("chosen_", c_ids), ("rejected_", r_ids)):
            am = batch.get(f"{prefix}attention_mask", torch.ones_like(x))
            cm = _completion(batch, prefix, ignore_index)
            _check_masks(x, am, cm, prefix)
            halves.append(
                (_pad_right(x, L, pad_token_id), _pad_right(am, L, 0), _pad_right(cm, L, 0))
            )
        ids, am, cm = (torch.cat(parts) for parts in zip(*halves, strict=True))
    else:
        raise KeyError(
            "a preference batch needs input_ids (+ completion_mask), as TRL's "
            "DataCollatorForPreference makes, or chosen_input_ids and rejected_input_ids"
        )
    if ids.shape[1] == 0:
        raise ValueError(
            "the preference batch has no tokens (every prompt and completion empty); drop empty "
            "examples from the dataset"
        )
    _check_masks(ids, am, cm, "")
    return PreferenceBatch(
        ids, am, cm, batch.get("ref_chosen_logps"), batch.get("ref_rejected_logps")
    )


def collate_preferences(
    examples: list[Mapping[str, list[int]]], pad_token_id: int = 0
) -> dict[str, torch.Tensor]:
    """Token-id examples {prompt_ids, chosen_ids, rejected_ids} -> a concatenated batch.

    The layout TRL's DataCollatorForPreference makes (rows [chosen; rejected], right-padded), for
    loops and trainers that do not use TRL. Examples that carry precomputed reference sums
    (ref_chosen_logps, ref_rejected_logps: a number each) give them as [P] float32 tensors under
    the same keys, as TRL's collator does.
    """
    if not examples:
        raise ValueError(
            "collate_preferences got an empty batch: pass at least one example "
            "{prompt_ids, chosen_ids, rejected_ids}"
        )
    if not isinstance(pad_token_id, int):
        raise TypeError(
            f"pad_token_id must be an int, got {pad_token_id!r}; a tokenizer without a pad token "
            "(Llama's) can pad with its eos_token_id: padded positions are never attended or scored"
        )
    rows, completion = [], []
    for half in ("chosen_ids", "rejected_ids"):
        for i, e in enumerate(examples):
            prompt, answer = _token_ids(e, i, "prompt_ids"), _token_ids(e, i, half)
            rows.append(torch.cat([prompt, answer]))
            completion.append(torch.cat([torch.zeros_like(prompt), torch.ones_like(answer)]))
    L = max(len(r) for r in rows)
    ids = torch.full((len(rows), L), pad_token_id, dtype=torch.long)
    am = torch.zeros((len(rows), L), dtype=torch.long)
    cm = torch.zeros((len(rows), L), dtype=torch.long)
    for i, (r, c) in enumerate(zip(rows, completion, strict=True)):
        ids[i, : len(r)] = r
        am[i, : len(r)] = 1
        cm[i, : len(c)] = c
    out = {"input_ids": ids, "attention_mask": am, "completion_mask": cm}
    # Precomputed reference sums (TRL's column names) travel with the rows, as in TRL's collator:
    # dropped, a trainer without a ref_model would train reference-free without a word.
    keys = ("ref_chosen_logps", "ref_rejected_logps")
    # (a datasets.Dataset fills a key some rows lack with None)
    has = [e.get(k) is not None for e in examples if isinstance(e, Mapping) for k in keys]
    if any(has):
        if not all(has):
            raise KeyError(
                "collate_preferences: some examples carry ref_chosen_logps / ref_rejected_logps "
                "and some do not; precompute both for every example, or for none"
            )
        for k in keys:
            out[k] = torch.tensor([float(e[k]) for e in examples], dtype=torch.float32)
    return out


def _token_ids(example: Mapping[str, Any], i: int, key: str) -> torch.Tensor:
    """examples[i][key] as a 1-D int64 tensor, or an error naming the example and the key."""
    if not isinstance(example, Mapping) or key not in example:
        has = sorted(example) if isinstance(example, Mapping) else type(example).__name__
        raise KeyError(
            f"collate_preferences needs examples with prompt_ids, chosen_ids and rejected_ids; "
            f"examples[{i}] has {has} (no {key!r})"
        )
    ids = example[key]
    t = torch.as_tensor(ids) if len(ids) else torch.zeros(0, dtype=torch.long)
    if t.dim() != 1 or t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise TypeError(
            f"examples[{i}][{key!r}] must be a list of int token ids, got {t.dtype} of shape "
            f"{tuple(t.shape)}"
        )
    return t.long().cpu()


class PackedBatch(NamedTuple):
    """The rows of a PreferenceBatch back to back without padding (padding-free layout)."""

    input_ids: torch.Tensor  # [1, N]
    position_ids: torch.Tensor  # [1, N], restarting at 0 for every sequence
    cu_seqlens: torch.Tensor  # [2P + 1] int32 offsets, flash-attention's varlen convention
    labels: torch.Tensor  # [N] next token within the same sequence; ignore_index at each end
    mask: torch.Tensor  # [N] bool: the label is a completion token


def pack(b: PreferenceBatch, ignore_index: int = -100) -> PackedBatch:
    """Drop the padding of a right-padded batch: its real tokens back to back, rows in order."""
    keep = b.attention_mask != 0
    lengths = keep.sum(1)
    ids = b.input_ids[keep]
    if ids.numel() == 0:
        raise ValueError(
            "padding_free: the batch has no attended tokens (attention_mask is all 0); drop "
            "empty examples, or check the collator's attention_mask"
        )
    completion = (b.completion_mask != 0)[keep]
    cu = torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
    starts = torch.repeat_interleave(cu[:-1].long(), lengths)
    position = torch.arange(ids.numel(), device=ids.device) - starts
    last = torch.zeros_like(completion)
    last[cu[1:].long() - 1] = True  # a sequence's last token has no next token in the sequence
    labels = torch.roll(ids, -1).masked_fill(last, ignore_index)
    mask = torch.roll(completion, -1) & ~last
    return PackedBatch(ids[None], position[None], cu, labels, mask)
