"""One rank of the 2-process DDP test (tests/train/test_multigpu.py), started by `accelerate launch`.

TRL SFTTrainer + PEFT LoRA on the embedded tiny random Llama, gloo on CPU, the way
llmtune/train/sft.py builds its trainer. Each rank writes its final LoRA weights and the
batches it trained on, so the test can check that DDP kept the adapters identical while the
ranks saw different data.

    python -m tests.ddp_worker OUT_DIR [STEPS]
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path


def main(out_dir: str, steps: int = 4) -> None:
    import torch
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
    from safetensors.torch import save_file
    from trl import SFTConfig, SFTTrainer

    from llmtune.models import load_causal_lm, load_tokenizer, resolve_base

    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    out = Path(out_dir)
    path = resolve_base("embedded:tiny-random-llama")
    tokenizer = load_tokenizer(path)
    model = load_causal_lm(path, dtype=torch.float32)
    torch.manual_seed(0)  # the same LoRA init on every rank (DDP also broadcasts it)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear",
                                             bias="none", task_type="CAUSAL_LM"))

    g = torch.Generator().manual_seed(1)
    rows = [torch.randint(10, 1000, (24,), generator=g).tolist() for _ in range(2 * steps * world)]
    dataset = Dataset.from_dict({"input_ids": rows, "labels": rows})
    seen: list[str] = []

    class RecordingTrainer(SFTTrainer):
        def compute_loss(self, model, inputs, *args, **kwargs):
            seen.append(hashlib.sha1(inputs["input_ids"].numpy().tobytes()).hexdigest()[:12])
            return super().compute_loss(model, inputs, *args, **kwargs)

    args = SFTConfig(
        output_dir=str(out / "checkpoints"), max_steps=steps, per_device_train_batch_size=2, learning_rate=1e-2,
        lr_scheduler_type="constant", warmup_steps=0, seed=42, data_seed=42, bf16=False, fp16=False, use_cpu=True,
        ddp_backend="gloo", max_length=32, logging_steps=1, save_strategy="no", eval_strategy="no",
        report_to="none", disable_tqdm=True, dataloader_num_workers=0,
    )
    trainer = RecordingTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
    trainer.train()
    weights = {k: v.detach().contiguous().clone() for k, v in get_peft_model_state_dict(trainer.model).items()}
    save_file(weights, str(out / f"rank{rank}.safetensors"))
    (out / f"rank{rank}.json").write_text(json.dumps({
        "rank": rank, "world_size": world, "global_step": trainer.state.global_step, "batches": seen,
        "threads": torch.get_num_threads(), "backend": str(torch.distributed.get_backend()) if torch.distributed.is_initialized() else None,
    }))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 4)
