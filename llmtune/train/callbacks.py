"""Trainer callbacks: metrics file, sample replies at each eval, and a rich progress display."""

from __future__ import annotations

import json
import time
from pathlib import Path

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from transformers import TrainerCallback

from llmtune.console import console



class MetricsFile(TrainerCallback):
    """Append every log record (loss, lr, eval_loss, ...) to metrics.jsonl with its step."""

    def __init__(self, path: Path):
        self.path = path

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        record = {"step": state.global_step, "epoch": state.epoch, "time": time.time(), **logs}
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")


def generate_replies(model, tokenizer, prompts: list[list[dict]], max_new_tokens: int, eos_token: str) -> list[str]:
    """Greedy replies to chat prompts, one at a time (no padding effects), stopping at the end-of-turn token."""
    import torch

    eos_id = tokenizer.convert_tokens_to_ids(eos_token)
    replies = []
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    with torch.no_grad():
        for messages in prompts:
            ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
            ids = {k: v.to(device) for k, v in ids.items()}
            out = model.generate(
                **ids,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                use_cache=True,
                eos_token_id=eos_id,
                pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id,
            )
            replies.append(tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip())
    if was_training:
        model.train()
    return replies


class SampleReplies(TrainerCallback):
    """Generate replies to the recipe's fixed prompts at every evaluation; log them to samples.jsonl."""

    def __init__(self, tokenizer, prompts: list[list[dict]], max_new_tokens: int, eos_token: str, path: Path):
        self.tokenizer, self.prompts, self.max_new_tokens, self.eos_token, self.path = (
            tokenizer, prompts, max_new_tokens, eos_token, path,
        )

    def on_evaluate(self, args, state, control, model=None, **kwargs):
        if not state.is_world_process_zero or model is None or not self.prompts:
            return
        replies = generate_replies(model, self.tokenizer, self.prompts, self.max_new_tokens, self.eos_token)
        with self.path.open("a", encoding="utf-8") as f:
            for messages, reply in zip(self.prompts, replies):
                f.write(json.dumps({"step": state.global_step, "prompt": messages[-1]["content"], "reply": reply}) + "\n")
        console.print(f"[dim]step {state.global_step} sample:[/] {self.prompts[0][-1]['content']!r} -> {replies[0]!r}")


class RichProgress(TrainerCallback):
    """One progress bar for the run with the latest loss and eval loss beside it."""

    def __init__(self, label: str = "train"):
        self.label = label
        self.progress: Progress | None = None
        self.task = None
        self.last = ""

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        self.progress = Progress(
            TextColumn(f"[bold]{self.label}[/]"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[stats]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=console,
        )
        self.progress.start()
        self.task = self.progress.add_task(self.label, total=state.max_steps, completed=state.global_step, stats="")

    def on_step_end(self, args, state, control, **kwargs):
        if self.progress is not None:
            self.progress.update(self.task, completed=state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.progress is None or not logs:
            return
        if "loss" in logs:
            self.last = f"loss {logs['loss']:.4f}"
        if "eval_loss" in logs:
            self.last += f"  eval {logs['eval_loss']:.4f}"
        self.progress.update(self.task, stats=self.last)

    def on_train_end(self, args, state, control, **kwargs):
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
