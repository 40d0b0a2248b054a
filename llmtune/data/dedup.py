"""Near-duplicate detection with MinHash LSH (datasketch) over word shingles of a conversation."""

from __future__ import annotations

import re
import zlib

from llmtune.data.types import Conversation

NUM_PERM = 64
SHINGLE = 3
_WORD = re.compile(r"\w+", re.UNICODE)


def shingles(conversation: Conversation) -> set[bytes]:
    """Word 3-shingles of the dialogue. System turns are left out: a shared card or persona
    prompt would otherwise make every chat with the same character look alike."""
    words = _WORD.findall(" ".join(m.content for m in conversation.messages if m.role != "system").lower())
    if len(words) < SHINGLE:
        return {" ".join(words).encode()}
    return {" ".join(words[i : i + SHINGLE]).encode() for i in range(len(words) - SHINGLE + 1)}


def _crc32(data: bytes) -> int:
    # Deterministic and ~10x cheaper than datasketch's default sha1 per shingle.
    return zlib.crc32(data)


class NearDuplicateIndex:
    """Keeps the first of every group of conversations whose estimated Jaccard similarity
    of word 3-shingles reaches `threshold`; later ones are reported as duplicates of it."""

    def __init__(self, threshold: float):
        from datasketch import MinHash, MinHashLSH

        self.threshold = threshold
        self.permutations = MinHash(num_perm=NUM_PERM, seed=1, scheme="affine32").permutations  # drawn once, shared
        self.lsh = MinHashLSH(threshold=threshold, num_perm=NUM_PERM)
        self.keys: dict[str, str] = {}

    def check_and_add(self, key: str, conversation: Conversation) -> str | None:
        """The key of an earlier near-duplicate, or None (and the conversation is indexed)."""
        from datasketch import MinHash

        mh = MinHash(num_perm=NUM_PERM, hashfunc=_crc32, permutations=self.permutations, scheme="affine32")
        mh.update_batch(list(shingles(conversation)))
        hits = self.lsh.query(mh)
        if hits:
            return sorted(hits)[0]
        self.lsh.insert(key, mh)
        return None
