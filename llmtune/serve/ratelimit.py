"""Per-key rate limits with the `limits` library: in process memory, or in Redis shared by replicas.

A limit is configured as `requests_per_minute` + `burst` (what a token bucket takes). `limits`
has no token bucket, so each limit becomes a moving window (exact: it counts every request in
the last W seconds, also in Redis, where one Lua call checks and records atomically):

    at most A requests in any W seconds, W = ceil(60 * burst / requests_per_minute)
                                         A = max(burst, floor(requests_per_minute * W / 60))

So a key may make `burst` requests at once and, over time, never more than
`requests_per_minute` a minute. When 60 * burst / requests_per_minute is a whole number of
seconds (the defaults: 10 per 10 s) A is exactly `burst`; otherwise W is rounded up to whole
seconds and A rounded so the per-minute rate holds (120/min with burst 1: 2 per second). A
token bucket refills continuously, so right after a burst it lets a request through every
60/rpm seconds where the window waits for the burst to age out: the same burst and long-run
rate, never more.
"""

from __future__ import annotations

import math
from urllib.parse import urlsplit, urlunsplit

from limits import RateLimitItem, RateLimitItemPerSecond
from limits.errors import StorageError
from limits.storage import storage_from_string
from limits.strategies import MovingWindowRateLimiter

from llmtune.errors import LlmtuneError
from llmtune.serve.config import RateLimit
from llmtune.serve.keys import KeyRecord

NAMESPACE = "llmtune-key"


class RateLimiterUnavailable(LlmtuneError):
    """The shared rate-limit storage (Redis) cannot be reached (the gateway answers 503)."""


def _without_password(uri: str) -> str:
    parts = urlsplit(uri)
    if parts.password is None:
        return uri
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
    return urlunsplit(parts._replace(netloc=netloc))


def window_for(limit: RateLimit) -> RateLimitItem:
    """The moving window that stands for requests_per_minute + burst (see the module docstring)."""
    seconds = math.ceil(60 * limit.burst / limit.requests_per_minute)
    amount = max(limit.burst, math.floor(limit.requests_per_minute * seconds / 60))
    return RateLimitItemPerSecond(amount, seconds)


class KeyRateLimiter:
    """`allow(record)`: may this key start one more request now? Counted across every replica
    that shares the storage (`redis://...`); per process with `memory://`."""

    def __init__(self, storage_uri: str, default: RateLimit, by_name: dict[str, RateLimit] | None = None):
        self.default = default
        self.by_name = by_name or {}
        self.storage_uri = storage_uri
        self.display = _without_password(storage_uri)
        try:
            self.storage = storage_from_string(storage_uri, wrap_exceptions=True)
        except Exception as exc:  # unknown scheme, missing driver: say which setting is wrong
            raise RateLimiterUnavailable(f"rate_limit_storage `{self.display}`: {exc} "
                                         "(use memory:// or redis://HOST:6379/0)") from None
        self.limiter = MovingWindowRateLimiter(self.storage)

    def limit_for(self, record: KeyRecord) -> RateLimit:
        """The key's own limit (llmtune keys limit), else its name's in key_rate_limits, else the default."""
        if record.requests_per_minute and record.burst:
            return RateLimit(requests_per_minute=record.requests_per_minute, burst=record.burst)
        return self.by_name.get(record.name, self.default)

    def allow(self, record: KeyRecord) -> bool:
        try:
            return self.limiter.hit(window_for(self.limit_for(record)), NAMESPACE, record.id)
        except StorageError as exc:
            raise RateLimiterUnavailable(f"the rate-limit storage {self.display} cannot be reached: "
                                         f"{exc.storage_error}") from None
