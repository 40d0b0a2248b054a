"""The gateway's configuration file (serve/gateway.example.yaml documents every key)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, model_validator

from llmtune.errors import LlmtuneError
from llmtune.moderation.policy import ModerationConfig
from llmtune.schema import Section, load_yaml_model


class ServeConfigError(LlmtuneError):
    """The serve config file is unreadable or invalid."""


class RateLimit(Section):
    requests_per_minute: int = Field(60, gt=0, description="Requests a key may start per minute, over time.")
    burst: int = Field(10, gt=0, description="Requests a key may make at once before the per-minute rate applies.")


class WatermarkConfig(Section):
    enabled: bool = Field(
        True, description="Watermark every reply while it is sampled (KGW green lists keyed by the deployment secret, "
        "made at the first serve and kept in `store`; $LLMTUNE_WATERMARK_SECRET overrides it). Off only by `false` here.")
    delta: float = Field(2.0, gt=0, le=10, description="Logit bias added to green tokens: larger is easier to detect and costs more quality.")
    gamma: float = Field(0.25, gt=0, le=0.5, description="Share of the vocabulary that is green after each token (detection must use the same).")
    p_value: float = Field(1e-3, gt=0, lt=1, description="`llmtune watermark detect` calls a text watermarked below this p-value.")


class ServeConfig(Section):
    host: str = Field("127.0.0.1", description="Gateway bind address; 0.0.0.0 to expose it. vLLM always binds loopback.")
    port: int = Field(8000, gt=0, lt=65536, description="Gateway port (the one chat apps use).")
    store: str = Field(
        "serve/llmtune.db", description="Keys and audit: a SQLite file (no setup), or a database URL such as "
        "postgresql://llmtune:PASSWORD@db/llmtune for several replicas. $LLMTUNE_STORE overrides it.")
    audit_content: bool = Field(False, description="Also store the screened text in the audit table (off: a hash only).")
    audit_retention_days: int = Field(
        90, gt=0, description="Audit rows older than this are deleted by `llmtune audit purge` (run it daily).")
    rate_limit: RateLimit = Field(default_factory=RateLimit, description="Default per-key rate limit.")
    key_rate_limits: dict[str, RateLimit] = Field(
        default_factory=dict, description="Per-key-name overrides (a key's own limit, `llmtune keys limit`, comes first).")
    rate_limit_storage: str = Field(
        "memory://", description="Where rate-limit counts live: memory:// (this process) or redis://HOST:6379/0 "
        "(shared, so a key's limit holds across all replicas). $LLMTUNE_RATE_LIMIT_STORAGE overrides it.")
    max_body_bytes: int = Field(1_000_000, gt=0, description="Largest request body accepted (413 beyond).")
    max_header_bytes: int = Field(16_384, gt=0, description="Largest request header block accepted.")
    max_tokens_limit: int = Field(2048, gt=0, description="Largest max_tokens a request may ask for.")
    screen_window_chars: int = Field(
        64, gt=0, le=4096,
        description=(
            "Replies are screened at checkpoints: the first whitespace at least this many characters after the last one. "
            "A stream releases text only up to the last screened checkpoint; a plain reply goes through the same "
            "checkpoints, so both reach the same decision."
        ),
    )
    screen_context_chars: int = Field(
        400, ge=0, le=65536,
        description="Each checkpoint's window reaches this far back into the reply (the whole conversation's facts are kept anyway).",
    )
    screen_workers: int = Field(2, gt=0, le=64, description="Threads that screen requests and replies in parallel.")
    screen_timeout_s: float = Field(
        30, gt=0, le=3600, description="Longest a request or a reply checkpoint may take to screen; past it the gateway answers 503 (fails closed)."
    )
    max_context_tokens: int = Field(
        2048, gt=0, le=10_000_000,
        description="Text beyond what the served context holds is refused with 400 before screening (`llmtune serve` sets it to vLLM's context length).",
    )
    withheld_text: str = Field(
        "[reply withheld by the content policy]", max_length=500,
        description=(
            "Sent as the reply's final text when it is blocked (chat apps such as SillyTavern never read finish_reason, so "
            "without it a block looks like an empty or cut-off message). Empty: send nothing but finish_reason."
        ),
    )
    openapi_docs: bool = Field(False, description="Serve /docs, /redoc and /openapi.json (off: they describe the API to anyone who asks).")
    metrics_port: int | None = Field(
        None, gt=0, lt=65536, description="Serve Prometheus /metrics on this separate port (on metrics_host); off when null."
    )
    metrics_host: str = Field("127.0.0.1", description="Bind address of the metrics port (loopback by default).")
    metrics_on_gateway: bool = Field(False, description="Also serve /metrics on the gateway port, to requests with a valid API key.")
    shutdown_grace_s: float = Field(
        10, ge=0, le=600, description="On SIGTERM, SIGINT or SIGHUP: how long in-flight streams may finish before the gateway and vLLM stop."
    )
    upstream_api_key: str | None = Field(
        None, description="The key of a vLLM server the gateway did not start (`llmtune serve --upstream`); $LLMTUNE_UPSTREAM_KEY works too."
    )
    upstream_timeout_s: float = Field(300, gt=0, description="Longest wait for vLLM on one request.")
    moderation: ModerationConfig = Field(default_factory=ModerationConfig)
    watermark: WatermarkConfig = Field(default_factory=WatermarkConfig, description="The watermark on served replies (EU AI Act Art. 50(2)).")

    @model_validator(mode="before")
    @classmethod
    def _replaced_keys(cls, data):
        if isinstance(data, dict):
            if "keys_file" in data:
                raise ValueError(f"`keys_file` was replaced by `store` (a SQLite file or a database URL); import the "
                                 f"old file once with `llmtune keys import {data['keys_file']}` and remove the key")
            if "audit_log" in data:
                raise ValueError("`audit_log` was replaced by the audit table in `store`; remove the key "
                                 "(the old JSONL file stays as it is)")
        return data


def load_serve_config(path: str | Path | None) -> ServeConfig:
    """The gateway config file (None: every default), validated with file, line and key in errors."""
    if path is None:
        return ServeConfig()
    return load_yaml_model(ServeConfig, path, "serve config", ServeConfigError)
