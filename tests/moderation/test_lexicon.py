"""The lexicons and the gazetteer are data: their format is checked here."""

from __future__ import annotations

import re
import unicodedata

import pytest
import yaml

from llmtune.moderation import lexicon

LANGS = [p for p in sorted(lexicon.LEXICON_DIR.glob("*.yaml"))]


@pytest.mark.parametrize("path", LANGS, ids=lambda p: p.stem)
def test_language_file_format(path):
    doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert set(doc) <= lexicon.KEYS, set(doc) - lexicon.KEYS
    assert all(isinstance(v, int) for v in (doc.get("numbers") or {}).values())
    lang = lexicon.load_language(path)  # every entry compiles
    assert lang.patterns["sexual_terms"], f"{path.name} has no sexual terms"


def test_every_language_the_issue_names_has_a_lexicon():
    codes = {lang.code for lang in lexicon.languages()}
    assert {"fr", "de", "es", "pt", "it", "ru", "ja", "zh", "pl", "nl"} <= codes


@pytest.mark.parametrize("name,fields", [("public_figures.tsv", lexicon.FIGURE_FIELDS), ("organizations.tsv", lexicon.ORG_KINDS)])
def test_tsv_format(name, fields):
    path = lexicon.LEXICON_DIR / name
    lines = path.read_text(encoding="utf-8").splitlines()
    assert lines[0].split("\t")[:2] in (["name", "field"], ["name", "kind"])
    keys = set()
    for n, line in enumerate(lines[1:], 2):
        parts = line.split("\t")
        assert len(parts) == 4, f"{name}:{n}: {len(parts)} fields"
        assert parts[1] in fields, f"{name}:{n}: {parts[1]}"
        assert re.fullmatch(r"[A-Z]{2}|", parts[2]), f"{name}:{n}: country {parts[2]!r}"
        key = lexicon.name_key(parts[0])
        assert key not in keys, f"{name}:{n}: duplicate {parts[0]}"
        keys.add(key)
        assert unicodedata.is_normalized("NFC", line)
    assert len(keys) >= (4000 if name == "public_figures.tsv" else 500)


def test_gazetteer_finds_full_names_and_distinctive_aliases_only():
    g = lexicon.public_figures()
    found = {key for _, key, _ in g.find("a poem about taylorswift and Rihanna, then her and pink and lisa")}
    assert "taylor swift" in found and "rihanna" in found
    assert not found & {"her", "pink", "lisa"}
    assert not g.find("the mtg tournament and the drake by the pond")
