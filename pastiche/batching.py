"""Records -> token ids with completion-only labels -> length-grouped or packed micro-batches.

Labels are ``-100`` at every prompt and padding *position*; the completion and its end-of-turn
token keep their ids. Masking by position rather than by token id is what lets the model learn
to stop when the tokenizer's pad token is also its EOS token.

Micro-batches hold records of similar length under a token budget (rows x longest row), so
almost no padding is computed. With packing, several records share a row; each record starts
its own ``position_ids`` run at 0, which ``transformers`` turns into a block-diagonal attention
mask, so no record attends to another.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

IGNORE = -100


@dataclass
class Example:
    """One tokenized record: the prompt is context, the completion (+ end of turn) is learned."""

    input_ids: list[int]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.input_ids)


def read_records(path: str | Path) -> list[dict]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def encode(tokenizer, record: dict) -> Example:
    from pastiche.chat import encode_record

    prompt_ids, completion_ids = encode_record(tokenizer, record["prompt"], record["completion"], record.get("system"))
    return Example(prompt_ids + completion_ids, [IGNORE] * len(prompt_ids) + completion_ids)


def pack(examples: list[Example], row_tokens: int) -> list[Example]:
    """First-fit-decreasing: records into rows of at most ``row_tokens`` (a longer record gets its own row)."""
    rows: list[list[Example]] = []
    room: list[int] = []
    for example in sorted(examples, key=len, reverse=True):
        slot = next((i for i, free in enumerate(room) if free >= len(example)), None)
        if slot is None:
            rows.append([example])
            room.append(row_tokens - len(example))
        else:
            rows[slot].append(example)
            room[slot] -= len(example)
    return [PackedRow(row) for row in rows]


class PackedRow(Example):
    """Several records in one row; ``position_ids`` restart at 0 at each record."""

    def __init__(self, parts: list[Example]):
        super().__init__([t for p in parts for t in p.input_ids], [t for p in parts for t in p.labels])
        self.position_ids = [i for p in parts for i in range(len(p))]


def token_budget_batches(lengths: list[int], batch_tokens: int, seed: int) -> list[list[int]]:
    """Group indices of similar length into batches whose rows x longest row <= batch_tokens.

    Ties in length are broken by a seeded shuffle so equal-length records do not always meet.
    """
    order = list(range(len(lengths)))
    random.Random(seed).shuffle(order)
    order.sort(key=lambda i: lengths[i])
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        # Sorted ascending, so the newest record is the longest in the batch.
        if current and (len(current) + 1) * lengths[i] > batch_tokens:
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


class BudgetBatchSampler:
    """Fixed length-grouped batches, visited in a fresh seeded order each epoch.

    The order depends only on (seed, epoch), which the Trainer sets through ``set_epoch``, so an
    interrupted run resumed from a checkpoint sees exactly the batches it would have seen.
    """

    def __init__(self, lengths: list[int], batch_tokens: int, seed: int, shuffle: bool = True):
        self.batches = token_budget_batches(lengths, batch_tokens, seed)
        self.seed, self.shuffle, self.epoch = seed, shuffle, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        order = list(range(len(self.batches)))
        if self.shuffle:
            random.Random(self.seed * 1000 + self.epoch).shuffle(order)
        return iter([self.batches[i] for i in order])


class Collator:
    """Pad a micro-batch on the right; padding positions are masked by position, never by id."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, examples: list[Example]) -> dict:
        import torch

        width = max(len(e) for e in examples)
        input_ids = torch.full((len(examples), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
        for row, e in enumerate(examples):
            input_ids[row, : len(e)] = torch.tensor(e.input_ids)
            labels[row, : len(e)] = torch.tensor(e.labels)
        batch = {"input_ids": input_ids, "labels": labels, "useful_tokens": torch.tensor(sum(map(len, examples)))}
        if isinstance(examples[0], PackedRow):
            # No attention mask: transformers derives a block-diagonal one from position_ids.
            # The padding tail is a run of its own, so it attends to nothing real either.
            positions = torch.zeros_like(input_ids)
            for row, e in enumerate(examples):
                positions[row, : len(e)] = torch.tensor(e.position_ids)
                positions[row, len(e):] = torch.arange(width - len(e))
            batch["position_ids"] = positions
        else:
            lengths = torch.tensor([len(e) for e in examples])
            batch["attention_mask"] = (torch.arange(width)[None, :] < lengths[:, None]).long()
        return batch
