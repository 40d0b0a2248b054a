"""The hard floor cannot be turned off: not by a recipe key, not by a threshold, not by the environment."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from llmtune.moderation.policy import CONFIGURABLE, HARD_FLOOR, ModerationConfig


def test_defaults_block_every_configurable_category():
    cfg = ModerationConfig()
    assert cfg.enabled and cfg.adapter == "embedded"
    assert cfg.categories == dict.fromkeys(CONFIGURABLE, True)
    assert HARD_FLOOR == ("minor_sexual", "real_person_sexual")


@pytest.mark.parametrize("category", HARD_FLOOR)
@pytest.mark.parametrize("value", [False, 0, "no", None])
def test_switching_off_the_floor_is_a_validation_error(category, value):
    with pytest.raises(ValidationError, match="hard safety floor and cannot be turned off"):
        ModerationConfig(categories={category: value})


@pytest.mark.parametrize("category", HARD_FLOOR)
def test_the_floor_thresholds_cannot_be_overridden(category):
    with pytest.raises(ValidationError, match="hard safety floor"):
        ModerationConfig(thresholds={category: 1.0})


def test_assignment_is_validated_too():
    cfg = ModerationConfig()
    with pytest.raises(ValidationError, match="hard safety floor"):
        cfg.categories = {"minor_sexual": False}


def test_configurable_categories_merge_with_defaults_and_unknown_keys_are_refused():
    cfg = ModerationConfig(categories={"bestiality": False})
    assert cfg.categories == {"sexual_violence": True, "bestiality": False, "illegal_instructions": True}
    assert not cfg.blocks("bestiality") and cfg.blocks("sexual_violence")
    with pytest.raises(ValidationError, match="unknown key|extra"):
        ModerationConfig(hard_floor=False)
    with pytest.raises(ValidationError, match="only the adapter's configurable categories"):
        ModerationConfig(thresholds={"gambling": 0.5})


def test_blocks_ignores_anything_that_slipped_past_validation():
    # model_construct skips validation; the floor is decided by the constant, not by the dict.
    sneaky = ModerationConfig.model_construct(enabled=False, categories={"minor_sexual": False, "real_person_sexual": False})
    assert all(sneaky.blocks(c) for c in HARD_FLOOR)
    assert not any(sneaky.blocks(c) for c in CONFIGURABLE)


def test_environment_variables_do_not_configure_moderation(monkeypatch):
    for name in ("LLMTUNE_MODERATION", "LLMTUNE_MODERATION_ENABLED", "LLMTUNE_MODERATION_HARD_FLOOR",
                 "MODERATION_ENABLED", "LLMTUNE_MODERATION_CATEGORIES", "LLMTUNE_SAFETY"):
        monkeypatch.setenv(name, "0")
    cfg = ModerationConfig()
    assert cfg.enabled and all(cfg.blocks(c) for c in HARD_FLOOR + CONFIGURABLE)
