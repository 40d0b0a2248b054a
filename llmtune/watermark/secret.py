"""The deployment's watermark key: $LLMTUNE_WATERMARK_SECRET, else the secret in the serve store
(made at the first `llmtune serve`; replicas on one PostgreSQL store share it)."""

from __future__ import annotations

import os

from llmtune.errors import LlmtuneError
from llmtune.watermark.scheme import SCHEME, WatermarkKey

SECRET_NAME = f"watermark/{SCHEME}"
SECRET_ENV = "LLMTUNE_WATERMARK_SECRET"


def deployment_key(store, gamma: float, create: bool = True) -> WatermarkKey:
    """The key `llmtune serve` marks with and `llmtune watermark detect` tests with, from the same store."""
    override = os.environ.get(SECRET_ENV)
    if override:
        return WatermarkKey(override.encode(), gamma)
    value = store.deployment_secret(SECRET_NAME, create=create)
    if value is None:
        raise LlmtuneError(f"no watermark secret in {store.display}: run `llmtune serve` from here once (it makes one), "
                           f"pass the deployment's store with --store or --config, or set ${SECRET_ENV}")
    return WatermarkKey(bytes.fromhex(value), gamma)
