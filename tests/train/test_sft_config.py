"""`sft_config(recipe, ...)`: the recipe's training keys map one to one onto TRL's SFTConfig."""

from __future__ import annotations

import torch

from llmtune.config import load_recipe
from llmtune.train.sft import sft_config


def test_recipe_keys_map_onto_trls_arguments(tiny_recipe, tmp_path):
    recipe = load_recipe(tiny_recipe(training={"max_steps": 7, "gradient_accumulation_steps": 3, "learning_rate": 5e-4,
                                               "seed": 11, "save_total_limit": 2, "group_by_length": True}))
    args = sft_config(recipe, output_dir=tmp_path / "ckpt", device="cpu", dtype=torch.float32, checkpointing=True,
                      packing=False, has_val=True)
    t = recipe.training
    assert (args.max_steps, args.gradient_accumulation_steps, args.learning_rate) == (7, 3, 5e-4)
    assert args.per_device_train_batch_size == args.per_device_eval_batch_size == t.micro_batch_size
    assert (args.seed, args.data_seed, args.save_total_limit) == (11, 11, 2)
    assert args.max_length == recipe.data.max_seq_length and args.output_dir == str(tmp_path / "ckpt")
    assert args.gradient_checkpointing and args.use_cpu and not (args.bf16 or args.fp16)
    assert args.eval_strategy == "steps" and args.train_sampling_strategy == "group_by_length"


def test_packing_and_no_validation_split(tiny_recipe, tmp_path):
    recipe = load_recipe(tiny_recipe(training={"group_by_length": True}))
    args = sft_config(recipe, output_dir=tmp_path, device="cpu", dtype=torch.float32, checkpointing=False,
                      packing=True, has_val=False)
    assert args.packing and args.packing_strategy == "bfd"
    assert args.train_sampling_strategy == "random"  # packing leaves no padding to group away
    assert args.eval_strategy == "no" and not args.gradient_checkpointing
