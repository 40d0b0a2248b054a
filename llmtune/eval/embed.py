"""Sentence embeddings with the embedded MiniLM encoder (mean pooling, as it was trained)."""

from __future__ import annotations


class SentenceEncoder:
    def __init__(self, base: str = "embedded:minilm-l6"):
        from transformers import AutoModel, AutoTokenizer

        from llmtune.encoder import resolve_encoder

        path = resolve_encoder(base)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path).eval()

    def encode(self, texts: list[str], batch_size: int = 64):
        """L2-normalised embeddings, one row per text."""
        import torch

        from llmtune.encoder import mean_pool

        rows = []
        with torch.no_grad():
            for i in range(0, len(texts), batch_size):
                enc = self.tokenizer(texts[i : i + batch_size], padding=True, truncation=True, max_length=256,
                                     return_tensors="pt")
                hidden = self.model(**enc).last_hidden_state
                rows.append(torch.nn.functional.normalize(mean_pool(hidden, enc["attention_mask"]), dim=-1))
        return torch.cat(rows) if rows else torch.zeros(0, 384)
