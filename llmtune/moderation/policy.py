"""The moderation policy as a recipe section: what is screened, and what can never be switched off.

This module imports only pydantic, the standard library and `llmtune.schema`: `llmtune.config`
imports it at CLI start-up. The safety floor (docs/safety.md) lives in `HARD_FLOOR`, a constant;
nothing here or in the screener reads environment variables, so no recipe key, CLI flag or
environment variable can lower it.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from llmtune.schema import Section

# Screened in every stage whatever the config says: sexual content involving minors, and
# sexual content about real, identifiable people.
HARD_FLOOR: tuple[str, ...] = ("minor_sexual", "real_person_sexual")
# Built-in categories a platform may switch off; all default to blocked.
CONFIGURABLE: tuple[str, ...] = ("sexual_violence", "bestiality", "illegal_instructions")
# The adapter's blocking heads, in logit order.
BUILTIN_CATEGORIES: tuple[str, ...] = HARD_FLOOR + CONFIGURABLE
# Signal heads after them: never block on their own; they feed the conversation's facts (a turn
# is sexual or romantic; a participant is a minor; a real person is involved).
SIGNALS: tuple[str, ...] = ("sexual", "minor", "real_person")

CATEGORY_DESCRIPTIONS: dict[str, str] = {
    "minor_sexual": "sexual or romantic-sexual content involving a minor, whatever the framing (hard floor)",
    "real_person_sexual": "sexual or romantic-sexual content about a real, identifiable person (hard floor)",
    "sexual_violence": "depictions of or requests for non-consensual sexual acts",
    "bestiality": "sexual content involving animals",
    "illegal_instructions": "actionable instructions for serious crimes (weapons, drugs, malware, fraud)",
}

_NAME = re.compile(r"^[a-z][a-z0-9_]{1,47}$")


def policy_categories(policy_file: str | None) -> list[str]:
    """The category names a platform policy file defines (read lightly: its keys only). A file
    that is missing or unreadable defines none here; the screener reports it when it loads."""
    if not policy_file:
        return []
    try:
        import yaml

        doc = yaml.safe_load(Path(policy_file).expanduser().read_text(encoding="utf-8")) or {}
        return [str(k) for k in (doc.get("categories") or {})] if isinstance(doc, dict) else []
    except (OSError, ValueError, AttributeError):
        return []
    except Exception:  # noqa: BLE001 - a YAML error is reported by the screener with its line
        return []


class PolicyCategory(Section):
    """A category a platform adds in its policy file: literal keywords and/or regular expressions."""

    description: str = Field("", description="What the category blocks, for reports and the model card.")
    keywords: list[str] = Field(default_factory=list, description="Literal phrases (case- and accent-folded, whole words, any spacing between them).")
    patterns: list[str] = Field(default_factory=list, description="Python regular expressions (case-insensitive, matched on the normalised text).")
    requires_sexual_context: bool = Field(False, description="Block only when the text also has a sexual context.")

    @field_validator("patterns")
    @classmethod
    def _compiles(cls, value: list[str]) -> list[str]:
        for p in value:
            try:
                re.compile(p)
            except re.error as exc:
                raise ValueError(f"`{p}` is not a valid regular expression ({exc})") from None
        return value

    @model_validator(mode="after")
    def _has_rules(self) -> PolicyCategory:
        if not self.keywords and not self.patterns:
            raise ValueError("give at least one of keywords: or patterns:")
        return self


class PolicyFile(Section):
    """A platform's policy YAML (`moderation.policy_file`): extra categories and real people's names."""

    categories: dict[str, PolicyCategory] = Field(default_factory=dict, description="Platform categories by name (lower_snake_case).")
    real_person_names: list[str] = Field(default_factory=list, description="Real people's names the floor blocks sexual content about.")
    real_person_names_file: str | None = Field(None, description="A text file of more names (one per line, `#` comments), relative to the policy file.")

    @field_validator("categories", "real_person_names", mode="before")
    @classmethod
    def _empty(cls, value: object, info: ValidationInfo) -> object:
        if value is None:  # `categories:` with nothing under it
            return {} if info.field_name == "categories" else []
        return value

    @field_validator("categories", mode="before")
    @classmethod
    def _names(cls, value: object) -> object:
        for name in value if isinstance(value, dict) else ():
            if name in BUILTIN_CATEGORIES:
                raise ValueError(f"`{name}` is built in; pick a new name for a platform category")
            if not re.match(r"^[a-z][a-z0-9_]{1,47}$", str(name)):
                raise ValueError(f"`{name}`: category names are lower_snake_case (a-z, 0-9, _; 2-48 characters)")
        return value


def _floor_error(key: str, what: str) -> ValueError:
    return ValueError(
        f"`{key}` is part of the hard safety floor and cannot be turned off ({what}); "
        f"the floor ({', '.join(HARD_FLOOR)}) is screened in every stage whatever the recipe says "
        "(docs/safety.md). Remove the key."
    )


class ModerationConfig(Section):
    """How llmtune screens training rows, prompts, system prompts, character cards and outputs."""

    enabled: bool = Field(
        True,
        description=(
            "Screen the configurable categories (and any the policy file adds). When false, only the "
            "hard floor (minor_sexual, real_person_sexual) is screened; it is screened in every stage "
            "either way and cannot be turned off."
        ),
    )
    policy_file: str | None = Field(
        None,
        description=(
            "A platform's YAML policy: extra categories with keyword/regex rules, and its own list of "
            "real people's names (see docs/moderation.md)."
        ),
    )
    categories: dict[str, bool] = Field(
        default_factory=lambda: dict.fromkeys(CONFIGURABLE, True),
        description=(
            "Configurable categories to block (default: all true): sexual_violence, bestiality, "
            "illegal_instructions, plus any the policy file defines. Setting minor_sexual or "
            "real_person_sexual to false is an error: the hard floor cannot be turned off."
        ),
    )
    real_person_names_file: str | None = Field(
        None,
        description="A text file of extra real people's names (one per line, `#` comments) added to the built-in list.",
    )
    adapter: str = Field(
        "embedded",
        description="A trained moderation adapter directory, or `embedded` for the adapter shipped in the package.",
    )
    thresholds: dict[str, float] | None = Field(
        None,
        description=(
            "Override the adapter's calibrated score thresholds for configurable categories only "
            "(0 < t <= 1); the floor's thresholds are frozen at calibration."
        ),
    )
    bulk: Literal["cascade", "full"] = Field(
        "cascade",
        description=(
            "How `prepare` screens training data. `cascade`: a conversation that no rule or fact could block and that "
            "the classifier's distilled first stage clears skips the full screen (measured against the full classifier in "
            "docs/moderation.md); `full`: every conversation through rules, facts and the classifier. The gateway always "
            "screens in full."
        ),
    )
    precision: Literal["auto", "float32", "bfloat16"] = Field(
        "auto",
        description=(
            "Arithmetic of the adapter's encoder on CPU. `auto`: bfloat16 where the CPU has native "
            "bf16 instructions (AVX512-BF16, AMX; about 2x the throughput, scores within ~0.01 of "
            "float32), else float32. Rules, and so the hard floor's deterministic layer, are unaffected."
        ),
    )

    @field_validator("categories", mode="before")
    @classmethod
    def _merge_defaults(cls, value: object) -> object:
        if not isinstance(value, dict):
            return value
        for key, on in value.items():
            if key in HARD_FLOOR and on is not True:
                raise _floor_error(key, f"moderation.categories.{key}: {on!r}")
        return {**dict.fromkeys(CONFIGURABLE, True), **value}

    @field_validator("categories")
    @classmethod
    def _category_names(cls, value: dict[str, bool], info: ValidationInfo) -> dict[str, bool]:
        bad = [k for k in value if not _NAME.match(k)]
        if bad:
            raise ValueError(f"category names are lower_snake_case (a-z, 0-9, _); got {bad}")
        known = [*CONFIGURABLE, *policy_categories(info.data.get("policy_file"))]
        for key in value:
            if key not in known and key not in HARD_FLOOR:
                close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
                hint = f"did you mean `{close[0]}`?" if close else f"known: {', '.join(known)}"
                raise ValueError(f"unknown category `{key}`; {hint} (platform categories come from moderation.policy_file)")
        return value

    @field_validator("thresholds")
    @classmethod
    def _configurable_thresholds(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        if value is None:
            return value
        for key, t in value.items():
            if key in HARD_FLOOR:
                raise _floor_error(key, f"moderation.thresholds.{key}: the floor's calibrated threshold is frozen")
            if key not in CONFIGURABLE:
                raise ValueError(
                    f"moderation.thresholds.{key}: only the adapter's configurable categories have thresholds "
                    f"({', '.join(CONFIGURABLE)}); policy-file categories are rule-only"
                )
            if not 0.0 < t <= 1.0:
                raise ValueError(f"moderation.thresholds.{key} must be in (0, 1]; got {t}")
        return value

    def blocks(self, category: str) -> bool:
        """Whether a hit in `category` blocks. The floor always does; the rest follow `enabled` and `categories`."""
        if category in HARD_FLOOR:
            return True
        return self.enabled and self.categories.get(category, True)
