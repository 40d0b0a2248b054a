"""Near-duplicate detection with MinHash LSH (datasketch) over word shingles of a conversation."""

from __future__ import annotations

import re
import zlib

import numpy as np

from llmtune.data.types import Conversation

NUM_PERM = 64
_WORD = re.compile(r"\w+", re.UNICODE)


class NearDuplicateIndex:
    """Keeps the first of every group of conversations whose estimated Jaccard similarity
    of word 3-shingles reaches `threshold`; later ones are reported as duplicates of it."""

    def __init__(self, threshold: float):
        from datasketch import MinHash, MinHashLSH

        self.threshold = threshold
        self.lsh = MinHashLSH(threshold=threshold, num_perm=NUM_PERM)
        # Drawn once and shared: datasketch would otherwise redraw them for every MinHash.
        self.permutations = MinHash(num_perm=NUM_PERM, seed=1, scheme="affine32").permutations
        self._word_hash: dict[str, int] = {}

    def shingle_hashes(self, conversation: Conversation) -> list[int]:
        """32-bit hashes of the dialogue's word 3-shingles. System turns are left out: a shared
        card or persona prompt would otherwise make every chat with one character look alike.
        Words are hashed once (crc32, deterministic) and combined with numpy, not per shingle."""
        text = " ".join(m.content for m in conversation.messages if m.role != "system").lower()
        words = _WORD.findall(text)
        cache = self._word_hash
        ids = np.fromiter(
            (cache[w] if w in cache else cache.setdefault(w, zlib.crc32(w.encode())) for w in words),
            dtype=np.uint64, count=len(words),
        )
        if len(ids) < 3:
            return [int(zlib.crc32(" ".join(words).encode()))]
        mixed = (ids[:-2] * np.uint64(0x9E3779B1) + ids[1:-1] * np.uint64(0x85EBCA77) + ids[2:]) & np.uint64(0xFFFFFFFF)
        return np.unique(mixed).tolist()

    def signature(self, conversation: Conversation) -> np.ndarray:
        """The conversation's MinHash values (a pure function of its text: safe to compute in workers)."""
        from datasketch import MinHash

        mh = MinHash(num_perm=NUM_PERM, hashfunc=int, permutations=self.permutations, scheme="affine32")
        mh.update_batch(self.shingle_hashes(conversation))
        return mh.hashvalues

    def _minhash(self, values: np.ndarray):
        from datasketch import MinHash

        return MinHash(num_perm=NUM_PERM, hashvalues=values, permutations=self.permutations, scheme="affine32")

    def matches(self, signature: np.ndarray) -> set[str]:
        """Keys of the indexed conversations this signature is a near-duplicate of (nothing is added)."""
        return set(self.lsh.query(self._minhash(signature)))

    def add(self, key: str, signature: np.ndarray) -> None:
        self.lsh.insert(key, self._minhash(signature), check_duplication=False)  # keys are unique file:line positions

    def check_and_add(self, key: str, conversation: Conversation, signature: np.ndarray | None = None) -> str | None:
        """The key of an earlier near-duplicate, or None (and the conversation is indexed)."""
        values = self.signature(conversation) if signature is None else signature
        hits = self.matches(values)
        if hits:
            return sorted(hits)[0]
        self.add(key, values)
        return None
