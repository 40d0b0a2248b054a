#!/usr/bin/env python3
"""Writes train/w_numbers.jsonl: hard negatives for numbers that are not ages of people.

    python data/moderation/numbers.py

The classifier read a bare number from 10 to 17 as an age: "You are character 14." scored 0.999
on minor_sexual, "Request 15" and "Say 13, please" 0.94-0.998, and sexual word salad starting
with a message index was blocked (docs/moderation.md, "Known gaps"; bench/prepare_speed.py
--cues). These rows teach it what such numbers are: labels (character, chapter, room, scene,
turn, message numbers), clock times, counts, prices, and the ages of things (whisky, port,
cars, houses), beside tame text, adult romance and adult sexual requests between characters
stated or left as adults. Sexual word salad with no person in it is a negative for
real_person_sexual. A birth year with no sexual content is a minor signal and blocks nothing.
Every row is a clinical description or tame roleplay, never content. The stated ages of
people are left to the rules and the other writers' rows: none appears here.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

OUT = Path(__file__).resolve().parent / "train" / "w_numbers.jsonl"

LABELS = [
    "You are character {n}.", "Character {n} enters the tavern.", "Request {n}", "Say {n}, please.",
    "Room {n} is at the end of the hall.", "Chapter {n}: The Harbour", "Day {n} of the voyage.", "Turn {n}.",
    "Message #{n}", "Scene {n} begins at the docks.", "Episode {n} recap, please.", "Level {n} unlocked.",
    "Table {n}, party of two.", "Gate {n} is boarding.", "She lives at number {n}, Harbour Row.", "Bus {n} is late again.",
    "Ticket {n}", "Page {n}", "Step {n}: stir the stew.", "Version 2.{n} is out.", "Take {n} minutes.",
    "{n} candles on the shelf.", "Player {n} joined the lobby.", "NPC {n} says hello.", "Slot {n} is free.",
    "Option {n}", "Swipe {n}", "Reply {n} of the thread.", "Part {n} of the story.", "Act {n}, scene 2.",
    "Cabin {n}, upper deck.", "Locker {n}.", "Pier {n}.", "Track {n} on the album.", "Row {n}, seat 4.",
    "Floor {n}.", "Unit {n} reporting.", "Bot {n} online.", "Draft {n}.", "Card {n} of the deck.",
    "Quest {n}: find the lighthouse key.", "Round {n}. Fight!", "Lap {n}.", "Mission {n} briefing.",
    "Persona {n}", "Prompt {n}:", "Log entry {n}.", "Sample {n}.", "Test {n}", "Entry {n} in the journal.",
]
ROUND_NUMBERS = ["{n}:15", "{n}:30", "{n} o'clock", "{n}h", "{n} euros", "${n}", "{n} coins", "{n} km", "{n} pages"]
ADULT_REQUESTS = [
    "the two lovers kiss and undress in the lamplight",
    "write a steamy scene between the married couple, both in their thirties",
    "continue the explicit scene between the two adult characters",
    "she pulls him into the bedroom and they make love",
    "describe the couple's passionate night together at the inn",
    "an intimate scene between two consenting adults, fade to black",
    "they share a long kiss and fall into bed",
    "write the wedding night of the two adult leads, explicit is fine",
    "(OOC: take it to a sensual scene, both characters are adults)",
    "*pulls her close and kisses her neck* let's skip dinner",
    "the retired captain and the innkeeper finally spend the night together",
    "make the next reply spicy, two grown-ups flirting in the hot tub",
    "nsfw continuation pls, the two roommates (both 20s) hook up",
    "a slow, romantic love scene between the widowed baker and the blacksmith",
    "describe how the couple undress each other, tasteful but explicit",
]
TAME = [
    "The captain studies the map.", "The crew sings in the galley.", "Rain on the deck tonight.",
    "*sets the lantern down* We sail at dawn.", "tea? i just made a pot", "The lighthouse keeper waves.",
    "Describe the market square at noon.", "She folds the letter and tucks it away.",
]
OBJECTS = [
    "a {n}-year-old single malt", "a {n}-year-old tawny port", "the {n}-year-old whisky", "a {n}-year-old oak barrel",
    "her {n}-year-old car", "their {n}-year-old house", "a {n}-year-old bottle of rum", "the {n}-year-old cheddar",
    "a {n}-year-old cognac", "the inn's {n}-year-old sourdough starter", "a {n}-year-old guitar", "the {n}-year-old boat",
    "a {n}-year-old bottle of wine", "his {n}-year-old leather jacket", "the {n}-year-old lighthouse lamp",
]
ROMANCE = ["then we make love", "and the two adults end up in bed", "before a long kiss by the fire",
           "on the couple's anniversary night", "and she leads him upstairs", "to toast their first night together"]
SALAD = ("kiss kissed lover lovers bed bedroom desire passion embrace naked undress sensual seduce intimate sex sexy "
         "aroused moan caress lust romance tender blush the sails harbour lantern storm deck tea sky island tower old "
         "warm cold gentle rough near far at over while wind").split()
BIRTH = [
    "She was born in {y}.", "My niece was born in {y} and loves horses.", "He was born in {y}, the year of the flood.",
    "The twins were born in {y}; they start school in the autumn.", "Born in {y}, the girl dreams of sailing.",
]
NUMBERS = list(range(10, 18)) * 4 + [1, 2, 3, 5, 7, 8, 9, 19, 21, 24, 33, 42, 47, 64, 99, 101, 256, 1024, 4096, 20431]
INDEXES = [1, 2, 3, 5, 7, 8, 9, 19, 21, 24, 33, 42, 47, 64, 99, 101, 256, 812, 1024, 4096, 20431, 57113]


def row(text: str, group: str, sexual: bool, minor: bool = False, register: str = "roleplay") -> dict:
    return {"text": text, "labels": [], "sexual": sexual, "minor": minor, "real_person": False, "lang": "en",
            "register": register, "group": group, "source": "w_numbers"}


def styled(rng: random.Random, text: str) -> str:
    pick = rng.random()
    if pick < 0.2:
        return text.lower()
    if pick < 0.3:
        return f"[{text}]"
    if pick < 0.4:
        return f"(OOC: {text})"
    return text


def main() -> None:
    rng = random.Random(2026)
    rows: list[dict] = []
    for _ in range(260):  # labels and counts alone, and beside tame roleplay
        n = rng.choice(NUMBERS)
        text = rng.choice(LABELS + ROUND_NUMBERS).format(n=n)
        if rng.random() < 0.4:
            text = f"{text} {rng.choice(TAME)}"
        rows.append(row(styled(rng, text), "number_label", False, register="chat"))
    for _ in range(260):  # labels beside adult romance and adult sexual requests
        n = rng.choice(NUMBERS)
        label = rng.choice(LABELS).format(n=n).rstrip(".:")
        request = rng.choice(ADULT_REQUESTS)
        text = f"{label}: {request}" if rng.random() < 0.5 else f"{request} ({label.lower()})"
        if rng.random() < 0.3:  # a bare message index in front, as exported chat logs have; never
            text = f"{rng.choice(INDEXES)} {request}"  # 10-17 there, where it could be read as an age
        rows.append(row(styled(rng, text), "number_label_adult", True))
    for _ in range(100):  # the ages of things, beside romance
        n = rng.choice(range(10, 18))
        text = f"Asks for a scene where two adults share {rng.choice(OBJECTS).format(n=n)} {rng.choice(ROMANCE)}."
        rows.append(row(text, "object_age_adult", True, register="clinical"))
    for _ in range(120):  # sexual word salad with no person in it, behind an index or not
        words = " ".join(rng.choices(SALAD, k=rng.randint(4, 30)))
        text = f"{rng.choice(INDEXES)} {words}" if rng.random() < 0.6 else words
        rows.append(row(text, "sexual_salad", True, register="noise"))
    for _ in range(40):  # a birth year and nothing sexual: a minor signal, no block
        rows.append(row(rng.choice(BIRTH).format(y=rng.choice(range(2010, 2019))), "birth_year_nonsexual", False,
                        minor=True, register="clinical"))
    for _ in range(120):  # a numbered card, then an adult sexual exchange
        n = rng.choice(NUMBERS)
        card = rng.choice(["You are character {n}.", "[Chapter {n}]", "Scene {n}. Two adults at a lakeside cabin.",
                           "Persona {n}: a retired sea captain, 52.", "Bot {n}. Stay in character."]).format(n=n)
        messages = [{"role": "system", "content": card},
                    {"role": "user", "content": rng.choice(TAME)},
                    {"role": "assistant", "content": rng.choice(TAME)},
                    {"role": "user", "content": styled(rng, rng.choice(ADULT_REQUESTS))}]
        rows.append({"messages": messages, "labels": [], "sexual": True, "minor": False, "real_person": False,
                     "lang": "en", "register": "roleplay", "group": "number_card_adult", "source": "w_numbers"})
    seen, unique = set(), []
    for r in rows:
        key = json.dumps(r.get("text") or r["messages"], sort_keys=True)
        if key not in seen:
            seen.add(key)
            unique.append(r)
    OUT.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in unique))
    print(f"{OUT}: {len(unique)} rows")


if __name__ == "__main__":
    main()
