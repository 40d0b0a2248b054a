"""The training speed-ups change how the loss is computed, never what it is.

Chunked loss-bearing-row cross-entropy and per-conversation packed attention against transformers' own loss and
masked attention (values and gradients), LoRA dropout drawn as 16-bit lanes against PEFT's `nn.Dropout`, and
whole runs of the optimised default path against the unoptimised one (no packing, TRL's LM-head loss, padded
batches in random order) on the same data with the same seed.
"""

from __future__ import annotations

import pytest
import torch

from llmtune.config import load_recipe
from llmtune.data.prepare import prepare
from llmtune.artifacts import read_metrics
from llmtune.train.sft import train
from tests.conftest import MEMORISE, write_conversations

pytestmark = [pytest.mark.slow]

UNOPTIMISED = {"packing": False, "chunked_loss": False, "group_by_length": False, "masked_dropout": False}


def tiny_lora_model(attn_implementation: str = "sdpa"):
    from peft import LoraConfig, get_peft_model

    from llmtune.models import load_causal_lm, resolve_base

    torch.manual_seed(0)
    base = load_causal_lm(resolve_base("embedded:tiny-random-llama"), dtype=torch.float32, attn_implementation=attn_implementation)
    base.config.use_cache = False
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False))
    return model


def packed_batch(seed: int = 0):
    """Three conversations packed padding-free into one row, as TRL's collator hands them over."""
    g = torch.Generator().manual_seed(seed)
    lengths = [13, 29, 22]
    ids = torch.randint(10, 49000, (1, sum(lengths)), generator=g)
    position_ids = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)
    labels = ids.clone()
    labels[:, :5] = -100  # a prompt
    labels[:, 20:30] = -100  # a user turn in the second conversation
    labels[position_ids == 0] = -100  # the collator's conversation starts
    bounds = torch.tensor([0, 13, 42, 64], dtype=torch.int32)
    extra = {"cu_seq_lens_q": bounds, "cu_seq_lens_k": bounds, "max_length_q": 29, "max_length_k": 29}
    return ids, position_ids, labels, extra


def lora_grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_chunked_loss_equals_the_standard_loss_and_gradients():
    from trl.trainer.utils import add_fused_lm_head

    from llmtune.train.chunked_loss import use_chunked_loss

    model = tiny_lora_model()
    ids, position_ids, labels, _ = packed_batch()
    num_items = int((labels[:, 1:] != -100).sum()) + 7  # a gradient-accumulation total over more micro-batches

    # transformers' own loss over full logits: the reference.
    logits = model(input_ids=ids, position_ids=position_ids).logits.float()
    per_token = torch.nn.functional.cross_entropy(
        logits[0, :-1], labels[0, 1:], ignore_index=-100, reduction="none"
    )
    reference_loss = per_token.sum() / num_items
    reference_loss.backward()
    reference = lora_grads(model)
    model.zero_grad()
    mask = labels[0, 1:] != -100
    reference_accuracy = (logits[0, :-1].argmax(-1) == labels[0, 1:])[mask].float().mean()
    reference_entropy = torch.distributions.Categorical(logits=logits[0, :-1][mask]).entropy().mean()

    add_fused_lm_head(model.get_base_model(), outputs=("log_probs", "entropy", "is_top1"))  # what SFTTrainer does
    assert use_chunked_loss(model, chunk_rows=8) is None
    out = model(input_ids=ids, position_ids=position_ids, labels=labels, fused_lm_head=True, num_items_in_batch=num_items)
    loss = -out.log_probs.sum() / num_items  # TRL's compute_loss reduction
    loss.backward()
    chunked = lora_grads(model)

    assert torch.allclose(out.loss, reference_loss, atol=1e-5, rtol=1e-5)
    assert torch.allclose(loss, reference_loss, atol=1e-5, rtol=1e-5)
    assert torch.equal(out.label_mask[0], mask)
    assert torch.allclose(-out.log_probs[0][mask], per_token[mask], atol=1e-5)
    assert (out.log_probs[0][~mask] == 0).all()
    n = mask.sum()
    assert torch.allclose(out.entropy.sum() / n, reference_entropy, atol=1e-5)
    assert torch.allclose(out.is_top1.sum() / n, reference_accuracy)
    assert reference.keys() == chunked.keys() and reference
    for name in reference:
        assert torch.allclose(chunked[name], reference[name], atol=1e-5, rtol=1e-4), name

    # Without gradients (evaluation) it returns the same loss and keeps nothing for backward.
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids, position_ids=position_ids, labels=labels, fused_lm_head=True).loss, out.loss * num_items / n, atol=1e-5)
    # Generation and plain calls still get the model's own forward.
    assert model(input_ids=ids[:, :5]).logits.shape == (1, 5, model.config.vocab_size)


def test_chunked_loss_never_holds_logits_for_all_tokens():
    from torch.utils._python_dispatch import TorchDispatchMode
    from trl.trainer.utils import add_fused_lm_head

    from llmtune.train.chunked_loss import use_chunked_loss

    model = tiny_lora_model()
    vocab = model.config.vocab_size
    add_fused_lm_head(model.get_base_model())
    assert use_chunked_loss(model, chunk_rows=8) is None
    ids, position_ids, labels, _ = packed_batch()
    assert ids.shape[1] > 8

    class LargestVocabBlock(TorchDispatchMode):
        rows = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor) and t.dim() >= 2 and t.shape[-1] == vocab and not func.is_view:
                    self.rows = max(self.rows, t.numel() // vocab)
            return out

    with LargestVocabBlock() as seen:
        out = model(input_ids=ids, position_ids=position_ids, labels=labels, fused_lm_head=True)
        (-out.log_probs.sum()).backward()
    assert 0 < seen.rows <= 8, seen.rows


def test_chunked_loss_steps_aside_for_a_trained_lm_head():
    from peft import LoraConfig, get_peft_model

    from llmtune.models import load_causal_lm, resolve_base
    from llmtune.train.chunked_loss import use_chunked_loss

    base = load_causal_lm(resolve_base("embedded:tiny-random-llama"), dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"]))
    assert "LM head" in use_chunked_loss(model)


def test_packed_attention_equals_masked_attention():
    from llmtune.train.packed_attention import use_packed_attention

    ids, position_ids, labels, extra = packed_batch()
    masked = tiny_lora_model()
    packed = tiny_lora_model()
    assert use_packed_attention(packed)
    want = masked(input_ids=ids, position_ids=position_ids, labels=labels)
    got = packed(input_ids=ids, position_ids=position_ids, labels=labels, **extra)
    assert torch.allclose(got.logits, want.logits, atol=1e-5)
    want.loss.backward()
    got.loss.backward()
    for name, grad in lora_grads(masked).items():
        assert torch.allclose(lora_grads(packed)[name], grad, atol=1e-5, rtol=1e-4), name
    # Without boundaries (padded batches, generation) it is transformers' sdpa with its mask.
    with torch.no_grad():
        assert torch.allclose(packed(input_ids=ids, position_ids=position_ids).logits, want.logits, atol=1e-5)


def run_losses(run_dir):
    metrics = read_metrics(run_dir / "metrics.jsonl")
    return [m["loss"] for m in metrics if "loss" in m], [m["eval_loss"] for m in metrics if "eval_loss" in m]


def token_weighted_eval_loss(prepared, adapter_dir) -> float:
    """Mean next-token loss over every loss-bearing validation token: the same measure for either run."""
    from datasets import load_from_disk
    from peft import PeftModel

    from llmtune.models import load_causal_lm, resolve_base

    base = load_causal_lm(resolve_base("embedded:tiny-random-llama"), dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    total, count = 0.0, 0
    for row in load_from_disk(str(prepared.val_tokenized)):
        ids, labels = torch.tensor([row["input_ids"]]), torch.tensor(row["labels"])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, :-1]
        total += torch.nn.functional.cross_entropy(logits, labels[1:], ignore_index=-100, reduction="sum").item()
        count += int((labels[1:] != -100).sum())
    return total / count


@pytest.mark.parametrize(
    "optimised",
    [{}, {"packing": False}],  # the default (packed, chunked loss, per-conversation attention); unpacked + grouped + chunked
    ids=["default", "unpacked"],
)
def test_optimised_training_reaches_the_unoptimised_eval_loss(tmp_path, tiny_recipe, optimised):
    """Full-batch epochs: each step sees every training conversation, so packing only changes the layout."""
    data = write_conversations(
        tmp_path / "chats.jsonl",
        MEMORISE + [[("user", f"Say {i}, please"), ("assistant", f"{i}, deckhand. " * (1 + i % 4))] for i in range(12)],
    )
    results = {}
    for name, training in (("unoptimised", UNOPTIMISED), ("optimised", optimised)):
        path = tiny_recipe(
            source=data,
            name=name,
            training={
                "max_steps": -1, "epochs": 6, "micro_batch_size": 16, "learning_rate": 1e-2,
                "eval_steps": 3, "save_steps": 100, "seed": 7, **training,
            },
            eval={"prompts": []},
        )
        recipe = load_recipe(path)
        prepared = prepare(recipe)
        result = train(recipe, prepared)
        results[name] = (prepared, result, *run_losses(recipe.run_dir))

    (prepared_a, a, train_a, eval_a), (prepared_b, b, train_b, eval_b) = results["unoptimised"], results["optimised"]
    assert len(train_a) == len(train_b) == 6  # one step per epoch either way
    assert train_a[-1] < 0.8 * train_a[0]  # the loss moved
    for x, y in zip(train_a, train_b):
        assert y == pytest.approx(x, rel=0.02)
    assert len(eval_a) == len(eval_b) and all(y == pytest.approx(x, rel=0.02) for x, y in zip(eval_a, eval_b))
    assert b.final_eval_loss == pytest.approx(a.final_eval_loss, rel=0.02)
    assert token_weighted_eval_loss(prepared_b, b.adapter_dir) == pytest.approx(token_weighted_eval_loss(prepared_a, a.adapter_dir), rel=0.02)


def test_mini_batch_runs_stay_within_two_percent(tmp_path, tiny_recipe):
    """Mini-batches: packing puts conversations into different batches, so runs agree closely, not exactly.

    micro_batch_size counts packed rows, and one 128-token row holds about three of these conversations: the packed
    run takes one row per step where the padded run takes four conversations, so both take small steps (40 and 64
    over 8 epochs) and reach the same plateau. (With equal micro_batch_size the packed run would take a quarter of
    the steps; the full-batch test above covers equal steps exactly.)"""
    data = write_conversations(
        tmp_path / "chats.jsonl",
        # 18-22 where 13-17 were: the classifier blocks a bare 13-17 (docs/moderation.md, known defects)
        MEMORISE + [[("user", f"Say {w}, please"), ("assistant", f"{w}, deckhand. " * (1 + i % 4))]
                    for i, w in enumerate([*range(13), *range(18, 25)])],
    )
    final = {}
    for name, training in (("unoptimised", {**UNOPTIMISED, "micro_batch_size": 4}), ("optimised", {"micro_batch_size": 1})):
        recipe = load_recipe(tiny_recipe(
            source=data, name=name, eval={"prompts": []},
            training={"max_steps": -1, "epochs": 8, "learning_rate": 3e-3, "eval_steps": 100,
                      "save_steps": 100, "seed": 7, **training},
        ))
        prepared = prepare(recipe)
        result = train(recipe, prepared)
        final[name] = token_weighted_eval_loss(prepared, result.adapter_dir)
    assert final["optimised"] == pytest.approx(final["unoptimised"], rel=0.02)


def test_masked_lora_dropout_reaches_nn_dropouts_eval_loss(tmp_path, tiny_recipe):
    """With LoRA dropout on, the 16-bit-lane masks (llmtune/lora_dropout.py) train to the eval loss of PEFT's
    nn.Dropout: different masks, the same regulariser. (At lr 1e-2 over 6 steps the masks' own noise moves the
    final loss by ~6% between two nn.Dropout seeds, so this run takes smaller steps: 12 epochs at 3e-3, where
    the two agreed within 0.5% (seed 7) and 0.7% (seed 8).)"""
    data = write_conversations(
        tmp_path / "chats.jsonl",
        MEMORISE + [[("user", f"Say {i}, please"), ("assistant", f"{i}, deckhand. " * (1 + i % 4))] for i in range(12)],
    )
    final = {}
    for masked in (False, True):
        recipe = load_recipe(tiny_recipe(
            source=data, name=f"masked-{masked}", eval={"prompts": []}, lora={"dropout": 0.1},
            training={"max_steps": -1, "epochs": 12, "micro_batch_size": 16, "learning_rate": 3e-3, "eval_steps": 100,
                      "save_steps": 100, "seed": 7, "masked_dropout": masked},
        ))
        prepared = prepare(recipe)
        result = train(recipe, prepared)
        losses = run_losses(recipe.run_dir)[0]
        assert losses[-1] < 0.8 * losses[0]  # it learned
        final[masked] = token_weighted_eval_loss(prepared, result.adapter_dir)
    assert final[True] == pytest.approx(final[False], rel=0.02)
