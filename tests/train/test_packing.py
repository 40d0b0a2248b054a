"""Packing: padding-free batches with per-sequence positions, and no attention or label across conversations."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from llmtune.config import load_recipe
from llmtune.data.prepare import prepare
from llmtune.models import load_base_model, placement_for
from llmtune.train.sft import packing_is_isolated

pytestmark = [pytest.mark.slow]


def test_trl_packed_batches_reset_positions_and_never_cross_a_boundary(tiny_recipe):
    from datasets import load_from_disk
    from trl import SFTConfig, SFTTrainer

    recipe = load_recipe(tiny_recipe(data={"val_fraction": 0.0, "max_seq_length": 128}))
    prepared = prepare(recipe)
    model = load_base_model(recipe, placement_for(recipe))
    model.config.use_cache = False
    assert packing_is_isolated(model)

    ds = load_from_disk(str(prepared.train_tokenized))
    args = SFTConfig(output_dir=str(recipe.run_dir / "t"), packing=True, packing_strategy="bfd", max_length=128,
                     per_device_train_batch_size=2, use_cpu=True, report_to="none", shuffle_dataset=False)
    trainer = SFTTrainer(model=model, args=args, train_dataset=ds)
    batch = next(iter(trainer.get_train_dataloader()))
    pos, labels, ids = batch["position_ids"][0], batch["labels"][0], batch["input_ids"][0]
    assert "attention_mask" not in batch
    starts = (pos == 0).nonzero().flatten().tolist()
    assert len(starts) >= 2, "the batch should hold several conversations"
    bounds = starts + [len(pos)]
    pieces = []
    for s, e in zip(bounds, bounds[1:]):
        assert pos[s:e].tolist() == list(range(e - s))  # positions restart per conversation
        assert labels[s] == -100  # nothing is predicted across the boundary
        pieces.append((ids[s:e], labels[s:e]))

    # The packed forward equals each conversation run alone: no attention across conversations.
    with torch.no_grad():
        packed_logits = model(input_ids=ids[None], position_ids=pos[None]).logits[0]
        total, count = 0.0, 0
        for (s, e), (x, y) in zip(zip(bounds, bounds[1:]), pieces):
            alone = model(input_ids=x[None]).logits[0]
            assert torch.allclose(packed_logits[s:e], alone, atol=1e-4)
            total += F.cross_entropy(alone[:-1], y[1:], ignore_index=-100, reduction="sum").item()
            count += int((y[1:] != -100).sum())
        packed_loss = F.cross_entropy(packed_logits[:-1], labels[1:], ignore_index=-100).item()
    assert abs(packed_loss - total / count) < 1e-4

