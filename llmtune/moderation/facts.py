"""Facts a conversation establishes, read from one text at a time: who is a minor, who is an
adult, who is a real person, which names are fictional characters, and where the talk turns
sexual or romantic.

    facts = extract_facts(text, where="messages[0].content", role="system", rules=screener.rules)

A fact's `scope` says how far it reaches:

- "conversation": it holds for the rest of the conversation (a character card's "Mia (16)", a
  name field "Lily_15", "you are a ninth-grader", a birth year, a listed public figure cast in
  the roleplay). A sexual or romantic turn anywhere in the same conversation, however far
  away, is blocked.
- "local": it only counts near a sexual cue in the same text, as the rules judge it (a child
  playing in the street, a parent's own children, a backstory age, a real person's song).

`conversation.ConversationState` accumulates facts message by message; this module only reads.
"""

from __future__ import annotations

import datetime as dt
import functools
import re
from dataclasses import dataclass, field

from llmtune.moderation import lexicon
from llmtune.moderation import rules as R
from llmtune.moderation.normalize import native, views

ADULT_AGE = R.ADULT_AGE
# A text this short (in words; CJK text counts as one) is one window for another language's cues.
LEXICON_WINDOW_WORDS = 40


@dataclass(frozen=True)
class Evidence:
    fact: str  # minor | adult | real_person | sexual | romantic | birth_year | story_year
    detail: str  # what kind of cue ("stated age under 18", "listed public figure", ...)
    text: str  # the matched words
    where: str  # "messages[2].content", "messages[1].name", "reply", "text"
    scope: str = "conversation"  # conversation | local
    subject: str = ""  # a lower-cased name when the fact is about someone named
    value: int | None = None  # an age or a year

    def to_json(self) -> dict:
        out = {"fact": self.fact, "detail": self.detail, "text": self.text, "where": self.where, "scope": self.scope}
        if self.subject:
            out["subject"] = self.subject
        if self.value is not None:
            out["value"] = self.value
        return out


@dataclass
class TextFacts:
    minor: list[Evidence] = field(default_factory=list)
    adult: list[Evidence] = field(default_factory=list)
    real: list[Evidence] = field(default_factory=list)
    sexual: list[Evidence] = field(default_factory=list)
    romantic: list[Evidence] = field(default_factory=list)
    years: list[Evidence] = field(default_factory=list)  # birth years and story years
    characters: set[str] = field(default_factory=set)  # name keys defined as fictional characters
    names: set[str] = field(default_factory=set)  # name keys mentioned (for dependants named later)

    def copy(self) -> "TextFacts":
        return TextFacts(list(self.minor), list(self.adult), list(self.real), list(self.sexual), list(self.romantic),
                         list(self.years), set(self.characters), set(self.names))

    def extend(self, other: "TextFacts") -> None:
        for key in ("minor", "adult", "real", "sexual", "romantic", "years"):
            getattr(self, key).extend(getattr(other, key))
        self.characters |= other.characters
        self.names |= other.names


# ---------------------------------------------------------------------------------------------
# Minor facts: scope

# A person noun ("a schoolgirl", "a kid") is about a participant when it is predicated of one.
_PARTICIPANT_BEFORE = R.rx(
    r"(?:\b(?:i'?m|i am|you'?re|you are|u r|ur|she'?s|she is|he'?s|he is|they'?re|they are|it'?s|is|are|was|were|be|being|becomes?|became"
    r"|plays?|playing|played|as|roleplay(?:s|ing)? as|rp as|pretend(?:s|ing)? to be|acts? as|portray(?:s|ing)?|character is|persona is"
    r"|oc is|{{char}} is|{{user}} is|\w+ is)\s+(?:(?:a|an|the|my|your|our|still|just|only|basically|like|really|actually|"
    r"literally|technically|now|also|very|quite|small|little|young|cute|shy|new|tiny)\s+){0,3}"
    r"|\b[a-z]+,\s+(?:a|an|the)\s+(?:\w+\s+){0,2})$"
)
# Ages in the past of someone who is older now: "when she was 15", "left home at 15", "as a kid".
_BACKSTORY_BEFORE = R.rx(
    r"(?:\b(?:when|since|until|till|before|after|back when|ever since|by the time|the year)\s+(?:\w+\s+){0,2}(?:was|were|turned|had turned|had been)"
    r"\s+(?:only\s+|just\s+|about\s+|around\s+)?(?:a\s+|an\s+)?"
    r"|\b(?:at|from|aged?|age)\s+(?:the age of\s+|age\s+)?(?=\d)"
    r"|\b(?:as|once|used to be|was once)\s+(?:a\s+|an\s+)?(?:little\s+|young\s+)?)$"
)
_BACKSTORY_AFTER = R.rx(r"^\W{0,3}\s*(?:years? ago|back then|in (?:her|his|their|my) (?:youth|childhood)|long ago)")
_PLACE = R.rx(r"^(?:(?:middle|elementary|primary|secondary|junior[\s-]high|grade|high)[\s-]?school|kindergarten|preschool|school[\s-]?age)$")
_FRAMING = R.rx(
    r"^(?:underaged?|under[\s-]age|under[\s-]+.*|not (?:yet )?(?:of age|an adult|legal)|below the age.*|(?:almost|nearly|not yet|not quite|soon to be|about to (?:turn|be)|turning|turns) 18"
    r"|age[\s-]?play\w*|age[\s-]regress\w*|agere\w*|little[\s-]?space|ddlg|mdlb|mdlg|ddlb|abdl|cgl|(?:has not|hasn't|have not|not yet|before|never) .*puberty|pre-?pubert\w*|prepubescent|pre-pubescent)$"
)
_NAME_INSIDE = re.compile(r"\b([A-Z][a-z'’-]{1,20})\b")
_NAME_BEFORE = re.compile(r"\b([A-Z][a-z'’-]{1,20})(?:\s+[A-Z][a-z'’-]{1,20})?\s*(?:\(|,|\bis\b|\bwas\b|'s\b)?\s*$")


def _minor_scope(cue, view: str, role: str) -> tuple[str, str]:
    """(scope, detail) of a minor cue found by the English rules."""
    before = view[max(0, cue.span[0] - 60): cue.span[0]]
    after = view[cue.span[1]: cue.span[1] + 40]
    if cue.dependent:
        return "local", "a dependant or a child elsewhere"
    if cue.kind in ("age", "grade"):
        if _BACKSTORY_BEFORE.search(before) or _BACKSTORY_AFTER.search(after):
            return "local", "an age in someone's past"
        return "conversation", "stated age under 18" if cue.kind == "age" else "school grade"
    if cue.kind in ("appearance", "euphemism"):
        return "conversation", "child-like appearance" if cue.kind == "appearance" else "euphemism for minors"
    evidence = cue.evidence.lower()
    if cue.kind == "child":
        if _PLACE.match(evidence):
            return "local", "a school setting"
        if _FRAMING.match(evidence):
            return "conversation", "minor or age-play framing"
    if _BACKSTORY_BEFORE.search(before):
        return "local", "someone's childhood"
    if _PARTICIPANT_BEFORE.search(before) or (role == "name"):
        return "conversation", "a participant described as a child" if cue.kind == "child" else "a participant described as a teen"
    return "local", "a child or teen mentioned"


# ---------------------------------------------------------------------------------------------
# Ages outside the English rules: name fields, birth years, indirect ages

_NAME_AGE = re.compile(r"(?<![0-9])(1[0-7]|[1-9])(?![0-9])")
_BIRTH = R.rx(
    r"\b(?:born|b\.|dob|date of birth|birth ?year|birthday)\s*[:\-]?\s*(?:in|on)?\s*(?:[a-z]+\s+)?(?:\d{1,2}(?:st|nd|rd|th)?,?\s+)?(?:of\s+)?((?:19|20)\d{2})\b"
    r"|\b(?:née?|nee|geboren|geb\.|nacid[ao]|nasci(?:da|do)|nat[ao]|родил(?:ась|ся)|urodzon[aey]|urodził[ao]?\s+się)\s+(?:(?:en|in|em|nel|w|im jahr|le|am)\s+)?(?:[^\d\s]+\s+){0,3}((?:19|20)\d{2})\b"
    r"|((?:19|20)\d{2})\s*(?:年生まれ|年生|年出生|年出世|年に生まれ)"
    r"|\bclass of ((?:19|20)\d{2})\b"
)
_STORY_YEAR = R.rx(
    r"\b(?:the (?:current )?year is|it(?:'s| is) (?:now |the year )?|in the year|year:|set in|story year:?|the story takes place in|takes place in|calendar (?:reads|says|shows))\s*((?:19|20|21)\d{2})\b"
    r"|^\s*\[?\s*((?:19|20|21)\d{2})\s*[\].:]"
    r"|\b(?:on est en|wir haben|es el año|estamos en|siamo nel|сейчас|mamy rok|het is)\s+((?:19|20|21)\d{2})\b"
)
_YEARS_TO_18 = R.rx(
    r"\b(?:turns?|turning|will be|becomes?)\s+18\s+(?:in|next)\s+(\d{1,2}|a|one|two|three|four|five|six|seven|eight|nine|ten)\s+(?:more\s+)?years?\b"
    r"|\b(\d{1,2}|a|one|two|three|four|five|six|seven|eight|nine|ten)\s+(?:more\s+)?years?\s+(?:away from|until|till|before|short of|from)\s+"
    r"(?:(?:turning|being|she'?s|he'?s|they'?re|i'?m)\s+)?(?:18|eighteen|an adult|adulthood|legal|(?:she|he|they|i) can (?:vote|drive))\b"
)
_INDIRECT_MINOR = R.rx(
    r"\b(?:can'?t|cannot|can not|isn'?t old enough to|is not old enough to|not old enough to|too young to) (?:legally )?(?:drive|vote|get a driver'?s licen[cs]e)(?: yet)?\b"
    r"|\bstill in (?:high|middle|elementary|primary|junior high|secondary) school\b"
    r"|\b(?:hasn'?t|has not|haven'?t) (?:even )?(?:graduated|finished) (?:high|middle) school\b"
    r"|\b(?:\w+ )?years? (?:of|left (?:of|in)) (?:high|middle) school (?:left|to go)\b"
    r"|\b(?:a |her |his )?(?:learner'?s permit|junior prom|homecoming dance|sweet sixteen|quincea[nñ]era)\b"
)
_SMALL_NUMBERS = {"a": 1, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8, "nine": 9, "ten": 10}


def this_year() -> int:
    return dt.date.today().year


def _indirect_ages(view: str, where: str) -> list[Evidence]:
    out = []
    for m in _YEARS_TO_18.finditer(view):
        token = (m.group(1) or m.group(2) or "").lower()
        years = int(token) if token.isdigit() else _SMALL_NUMBERS.get(token)
        if years and 0 < years <= 17:
            out.append(Evidence("minor", "age given as years until 18", m.group(0), where, value=18 - years))
    for m in _INDIRECT_MINOR.finditer(view):
        out.append(Evidence("minor", "a minor's life stage", m.group(0), where))
    return out


def _years(text: str, where: str) -> list[Evidence]:
    out = []
    for m in _BIRTH.finditer(text):
        year = int(next(g for g in m.groups() if g))
        if m.group(0).lower().lstrip().startswith("class of"):
            year -= 18  # the class of 2011 graduated in 2011, at about 18
        out.append(Evidence("birth_year", "birth year", m.group(0).strip(), where, value=year))
    for m in _STORY_YEAR.finditer(text):
        year = next(g for g in m.groups() if g)
        out.append(Evidence("story_year", "the story's year", m.group(0).strip(), where, value=int(year)))
    return out


def _name_field(name: str, where: str) -> TextFacts:
    """A message's `name` ("Lily_15", "kai.14", "Mia16"): the speaker is a character; digits that
    read as an age under 18 make it a minor (years like 1999 and long ids do not)."""
    facts = TextFacts()
    key = lexicon.name_key(re.sub(r"[\d_.\-]+", " ", name))
    if key:
        facts.characters.add(key)
        facts.names.add(key)
    digits = re.findall(r"\d+", name)
    if len(digits) == 1 and len(digits[0]) <= 2:
        n = int(digits[0])
        if 1 <= n < ADULT_AGE:
            facts.minor.append(Evidence("minor", "age in a message name", name, where, subject=key, value=n))
        elif n >= ADULT_AGE:
            facts.adult.append(Evidence("adult", "adult age in a message name", name, where, subject=key, value=n))
    return facts


# ---------------------------------------------------------------------------------------------
# Fictional characters defined in the text

_CHARACTER_DEF = re.compile(
    r"(?:\b(?:[Yy]ou are|[Yy]ou're|[Yy]ou play|[Pp]lay(?:ing)? as|[Rr]oleplay(?:ing)? as|RP as|[Pp]ortray|[Cc]haracter(?: name)?:|[Nn]ame:"
    r"|\{\{char\}\} is|[Aa] (?:fictional )?character (?:named|called)|[Mm]y (?:character|OC|oc|persona)(?: is)?(?: named| called)?|[Pp]ersona:)"
    r"\s+(?:the\s+|a\s+|an\s+)?([A-Z][\w'’-]+(?:\s+[A-Z][\w'’-]+){0,2}))"
)


def _characters(text: str) -> set[str]:
    return {lexicon.name_key(m.group(1)) for m in _CHARACTER_DEF.finditer(text)}


_CAPITALISED = re.compile(r"\b[A-Z][a-z'’-]{1,20}\b")


# ---------------------------------------------------------------------------------------------
# Real people

_LOOKALIKE_BEFORE = R.rx(
    r"(?:\b(?:looks?|looking|resembl\w*|like|lookalike|look-alike|styled after|inspired by|a poster of|a photo of|a picture of|cosplay(?:ing|s)? as|dressed as|a fan of|fan of|by|from|about the career of|biography of|the music of|songs? by|a song by|album by)\s+(?:\w+\s+){0,1})$"
)
_DESCRIBED = R.rx(
    r"\b(?:the|that|this)\s+(?:current\s+|former\s+|sitting\s+|famous\s+|real\s+|actual\s+)?(?:ceo|founder|co-?founder|owner|chairman|chairwoman|president|prime minister|pm|chancellor|premier"
    r"|king|queen|prince|princess|crown prince|first lady|vice president|governor|mayor|senator|minister|pope|head coach|coach|captain|striker|goalkeeper|quarterback|point guard"
    r"|lead singer|singer|frontman|frontwoman|drummer|guitarist|rapper|member|host|anchor|presenter|wife|husband|daughter|son|girlfriend|boyfriend|star|lead actress|lead actor|actress|actor)"
    r"\s+(?:of|at|for|from|on|in)\s+(?:the\s+)?([\w'’&.\- ]{2,40}?)(?=[\s,.;:!?)]|$)"
)
_DESCRIBED_WHO = R.rx(
    r"\b(?:the|that|this)\s+(?:\w+\s+){0,2}(?:billionaire|ceo|founder|owner|singer|actress|actor|rapper|streamer|youtuber|influencer|politician|president|athlete|player|host|star|celebrity|businessman|businesswoman)"
    r"\s+who\s+(?:bought|buys|founded|owns|owned|runs|ran|leads|led|fronts|hosts|hosted|plays for|played for|played|stars in|starred in|sings for|won|coaches|manages|created)\s+([\w'’&.\- ]{2,40}?)(?=[\s,.;:!?)]|$)"
)
# "the actor who played <a named role>": identifiable without any list.
_PLAYED = R.rx(r"\b(?:the|that)\s+(?:\w+\s+)?(?:actor|actress|voice actor|voice actress|star|singer|rapper|comedian|host)\s+who\s+"
              r"(?:played|plays|portrayed|portrays|voiced|voices|sang|sings|hosted|hosts|starred as|stars as)\s+\S+")
_PRIVATE = R.rx(
    r"\b(?:my|our)\s+(?:real\s+|actual\s+|irl\s+)?(?:co-?workers?|colleagues?|boss|manager|supervisor|employee|secretary|intern|neighbou?rs?|landlord|landlady|tenant|roommate|flatmate"
    r"|classmates?|ex|ex-?(?:girlfriend|boyfriend|wife|husband|partner)|crush|friend'?s (?:wife|husband|girlfriend|boyfriend|mom|mum|dad|sister|brother)|best friend|sister-in-law|brother-in-law"
    r"|step-?(?:sister|brother|mom|mum|dad)|cousin|aunt|uncle|teacher|professor|doctor|therapist|nurse|trainer|personal trainer|barista|cashier|mail ?carrier|pastor|priest)\b"
    r"|\b(?:a|this|that|some)\s+(?:girl|guy|woman|man|person|lady|dude)\s+(?:i know|i met|from (?:my|the) (?:work|office|gym|school|class|building|church|street|team)|at (?:my|the) (?:work|office|gym|school|church))\b"
    r"|\b(?:someone|somebody|a person) i (?:know|work with|met)\b"
)
_HANDLE = re.compile(r"(?<![\w@])@[A-Za-z0-9_][A-Za-z0-9_.]{2,29}\b")
_ADDRESS = R.rx(
    r"\b\d{1,5}\s+(?:[a-z]+\s+){1,3}(?:st|street|ave|avenue|rd|road|ln|lane|blvd|boulevard|dr|drive|ct|court|way|pl|place|terrace|crescent|close|rue|straße|strasse|calle|via)\b"
    r"|\blives? (?:at|on) \d{1,5}\b"
)
_REAL_NAME = R.rx(r"\b(?:use|using|with|by|under|put|call (?:her|him|them) by)\s+(?:her|his|their|my|the)\s+(?:real|actual|full|irl)\s+names?\b|\breal[\s-]life (?:version|name)\b")
_CASTING = R.rx(r"\b(?:you are|you're|you play|pretend(?:ing)? to be|roleplay(?:ing)? as|rp as|be|act as|play|with|and me|and i|me and|i and|date|dating|kiss|marry|about)\b")


# A real person cast in the roleplay or made the subject of the request, not only mentioned
# ("during Obama's first term", "at a Beyoncé concert").
_CAST_BEFORE = R.rx(
    r"(?:\b(?:you are|you're|ur|u r|you play|play|playing|be|as|roleplay(?:ing)? as|rp as|pretend(?:ing)? to be|act(?:ing)? as|"
    r"with|and me|me and|i and|date|dating|dates|kiss(?:es|ing)?|marry|marries|seduce\w*|about|starring|featuring|x|on|"
    r"undress\w*|imagine|picture|fantasy about|fantasi[sz]e about|story of|scene of|scene with|pics? of|photos? of|nudes? of|"
    r"deepfake of|is|named)\s+(?:the\s+|a\s+|real\s+|actual\s+){0,2})$"
)
_CAST_AFTER = R.rx(
    r"^(?:'s|’s)?\s*(?:and (?:me|i)\b|x\b|\+|naked|nude|undress\w*|in (?:bed|lingerie|a (?:sex|love|sexy|steamy|explicit))|"
    r"(?:'s|’s)?\s*(?:body|bodies|nudes?|photos?|pics?|boobs|ass|feet)|(?:kiss|seduc|flirt|sleep|hook|make)\w*|"
    r"(?:is|as) (?:my|your|the user's)|, (?:a|the) (?:\w+ ){0,2}who)"
)


def _cast(view: str, span: tuple[int, int], role: str) -> bool:
    if role in ("system", "name"):
        return True  # a card or a name field casts whoever it names
    return bool(_CAST_BEFORE.search(view[max(0, span[0] - 40): span[0]]) or _CAST_AFTER.search(view[span[1]: span[1] + 40]))


def _real_people(view: str, raw: str, where: str, role: str, characters: set[str]) -> list[Evidence]:
    out: list[Evidence] = []

    def scope_of(span) -> str:
        return "conversation" if role != "assistant" and _cast(view, span, role) else "local"

    found = lexicon.public_figures().find(view)
    if not raw.isascii():  # names in their own script ("Путин", "손흥민") are not in the Latin views
        found += [(span, key, person) for span, key, person in lexicon.public_figures().find(native(raw))
                  if key not in {k for _, k, _ in found}]
    for span, key, person in found:
        before = view[max(0, span[0] - 40): span[0]]
        after = view[span[1]: span[1] + 40]
        if re.match(R._NAME_WORK, after) or _LOOKALIKE_BEFORE.search(before):
            continue  # "a song by X", "X's new album", "looks like X": their work or a likeness, not them
        if key in characters and not re.search(r"\b(?:real|actual|the (?:actor|actress|singer|politician|athlete|streamer))\b", view):
            continue  # a name the conversation defines as a fictional character
        out.append(Evidence("real_person", f"listed public figure ({person.field}, {person.country or 'no country'})",
                            view[span[0]:span[1]], where, scope_of(span), subject=key))
    blanked = R._blank(view, R._EXEMPT)
    for m in R._REAL_CUE.finditer(blanked):
        out.append(Evidence("real_person", "a real, identifiable person", m.group(0).strip(), where,
                            "local" if role == "assistant" else "conversation"))
    for m in _PLAYED.finditer(blanked):
        out.append(Evidence("real_person", "a public figure described by a role they played", m.group(0).strip(), where,
                            scope_of(m.span())))
    orgs, places = lexicon.organizations(), lexicon.countries()
    for rx in (_DESCRIBED, _DESCRIBED_WHO):
        for m in rx.finditer(view):
            target = lexicon.name_key(m.group(1))
            words = target.split()
            known = any(" ".join(words[:n]) in orgs or " ".join(words[:n]) in places for n in range(len(words), 0, -1))
            if known:
                out.append(Evidence("real_person", "a public figure described by role", m.group(0).strip(), where,
                                    scope_of(m.span())))
    for rx, detail in ((_PRIVATE, "a private person the user knows"), (_REAL_NAME, "a real name asked for")):
        for m in rx.finditer(view):
            out.append(Evidence("real_person", detail, m.group(0).strip(), where, "conversation" if role != "assistant" else "local"))
    private = "local" if role == "assistant" else "conversation"
    for m in _HANDLE.finditer(raw):
        out.append(Evidence("real_person", "a social-media handle", m.group(0), where, private))
    for m in _ADDRESS.finditer(view):
        out.append(Evidence("real_person", "a street address", m.group(0).strip(), where, private))
    return out


# ---------------------------------------------------------------------------------------------
# Other languages


# A Latin-script lexicon runs only on text that shows its language: one of these words (function
# words, and the word for "years" that ages are given with). Scripts of their own (Cyrillic, CJK,
# Hangul, Arabic) show themselves. English words that are also words of another language ("swings"
# in Polish) then stop reading as that language's cues in English text.
_STOPWORDS = {
    "fr": "le la les un une des du de et est elle il je tu nous vous avec pour dans sur pas qui que ans mon ma ses sa son c'est j'ai écris écrire fais raconte",
    "de": "der die das ein eine und ist sie er ich du nicht mit für auf bei jahre jahren alt mein meine wir ihr den dem schreib schreibe erzähl mach "
          "über einen einem einer aus von zum zur vom im ins ihn ihm ihre seine noch nach wird werden hat haben zwischen",
    "es": "el la los las un una y es ella él yo tú con para por en que años mi mis su del al pero muy escribe haz cuenta",
    "pt": "o a os as um uma e é ela ele eu você com para por em que anos meu minha seu sua do da não escreva escreve faz conta",
    "it": "il lo la gli le un una e è lei lui io tu con per in che anni mio mia suo sua del della non scrivi fai racconta",
    "pl": "i w z na że się jest ona on ja ty do nie lat lata ma jak to jej jego mój moja o napisz zrób opowiadanie opowiedz "
          "ze dla przez który która które oraz przy pod nad między jestem bardzo tylko",
    "nl": "de het een en is zij hij ik jij met voor op in dat jaar jarige mijn haar zijn niet van schrijf maak vertel",
    "sv": "och är hon han jag du med för på i att år min mitt inte en ett av det skriv gör berätta",
    "tr": "ve bir bu ben sen o ile için değil yaşında yaş çok da de mi",
    "id": "dan yang di ini itu dia aku saya kamu dengan untuk tidak tahun umur",
    "tl": "ang ng sa mga si ako ikaw siya ay na hindi taon gulang at",
    "hi_latn": "hai hain ka ki ke mein aur nahi main tum woh saal kya ko se",
    "vi": "và là cô anh tôi em với của không tuổi một những này",
}
@functools.lru_cache(maxsize=1)
def _stopword_sets() -> dict[str, frozenset[str]]:
    """The words above, less those that are common English words too ("to", "die", "on")."""
    english = lexicon._common_words() | {"a", "i", "o", "to", "on", "in", "do", "die", "am", "be", "me", "we", "he", "no", "so"}
    return {code: frozenset(w for w in words.split() if w not in english) for code, words in _STOPWORDS.items()}
_TOKEN = re.compile(r"[^\W\d_]+(?:'[^\W\d_]+)?")


# Letters that English never uses and a language's words often do: short texts ("erotyczny RP z
# uczennicą z ósmej klasy") may hold no function word at all.
_LETTERS = {"de": "äöüß", "pl": "ąęłńśźżć", "pt": "ãõ", "es": "ñ¿¡", "tr": "ğışİ", "sv": "åäö", "vi": "ơưđạảấầẩẫậắằẳẵặẹẻẽếềểễệỉịọỏốồổỗộớờởỡợụủứừửữựỳỵỷỹ",
            "fr": "œàèùâêîôûëïüÿç", "it": "àèéìòù", "nl": "ĳ"}


def _shows_language(code: str, words: set[str], view: str) -> bool:
    stop = _stopword_sets().get(code)
    if stop is None:
        return True  # en_extra, and languages with a script of their own (their literals need it anyway)
    return bool(words & stop) or any(ch in view for ch in _LETTERS.get(code, ""))


def _number_ok(lang, m: re.Match) -> bool:
    """A match whose `{n}` (if any) is really a number of its language."""
    n = m.groupdict().get("n")
    return n is None or lang.number(n) is not None


def _lexicon_facts(text: str, where: str) -> TextFacts:
    facts = TextFacts()
    view = native(text)
    if len(view) > 50_000:
        view = view[:50_000]
    idx = lexicon.index()
    hits = idx.candidates(view)
    if not hits:
        return facts
    view = R._blank(view, R._EXEMPT)  # "no age-play", "no minors", "sex education" in any language's text
    words = set(_TOKEN.findall(view))
    with_hits = {li for li, _ in hits}
    for li, lang in enumerate(idx.langs):
        if li not in with_hits or not _shows_language(lang.code, words, view):
            continue
        p = lang.patterns

        def entries(key: str):
            return [p[key][i] for i in hits.get((li, key), ())]

        blanked = view
        for rx in entries("negations"):
            blanked = rx.sub(lambda m: " " * len(m.group(0)), blanked)
        not_person = entries("not_a_person")
        for rx in entries("age_patterns"):
            for m in rx.finditer(blanked):
                number = m.groupdict().get("n")
                value = lang.number(number) if number else None
                if value is None:
                    continue
                tail = blanked[m.end(): m.end() + 30]
                head = blanked[max(0, m.start() - 30): m.start()]
                # "un whisky de 12 ans", "een huwelijk van 15 jaar": the noun can stand on either side
                if any(nrx.match(tail.lstrip(" -")) or nrx.search(head[-20:] + m.group(0)) for nrx in p["not_a_person"]):
                    continue
                if any(e.text in m.group(0) or m.group(0) in e.text for e in facts.minor if e.value == value):
                    continue  # "elle a 15 ans" and "a 15 ans": one age
                if 0 < value < ADULT_AGE:
                    dependent = bool(R._DEPENDENT_BEFORE.search(blanked[max(0, m.start() - 60): m.start()]))
                    detail = "a dependant or a child elsewhere" if dependent else "stated age under 18"
                    facts.minor.append(Evidence("minor", f"{detail} ({lang.code})", m.group(0), where,
                                                "local" if dependent else "conversation", value=value))
                elif value >= ADULT_AGE:
                    facts.adult.append(Evidence("adult", f"adult age ({lang.code})", m.group(0), where, value=value))
        del not_person
        for key, detail, scope in (("school_patterns", "school level", "conversation"),
                                   ("appearance_patterns", "child-like appearance", "conversation"),
                                   ("ageplay_terms", "age-play framing", "conversation"),
                                   ("minor_terms", "child or teen word", "local")):
            for rx in entries(key):
                m = next((m for m in rx.finditer(blanked) if m.group(0).strip() and _number_ok(lang, m)), None)
                if m:
                    facts.minor.append(Evidence("minor", f"{detail} ({lang.code})", m.group(0), where, scope))
                    break
        for rx in entries("adult_patterns"):
            m = next((m for m in rx.finditer(blanked) if m.group(0).strip() and _number_ok(lang, m)), None)
            if m:
                facts.adult.append(Evidence("adult", f"stated adult ({lang.code})", m.group(0), where))
                break
        for key, fact in (("sexual_terms", "sexual"), ("romantic_terms", "romantic")):
            for rx in entries(key):
                m = next((m for m in rx.finditer(blanked) if m.group(0).strip() and _number_ok(lang, m)), None)
                if m:
                    getattr(facts, fact).append(Evidence(fact, f"{fact} term ({lang.code})", m.group(0), where))
                    break
    return facts


# ---------------------------------------------------------------------------------------------


def _any_sexual_term(text: str) -> bool:
    return bool(_lexicon_facts(text, "").sexual)


def extract_facts(text: str, where: str, role: str, rules: R.RuleSet | None = None, name: str | None = None) -> TextFacts:
    """Every fact `text` establishes. `role` is the message's role ("system" for cards, "user",
    "assistant", "reply" for the model's output, "name" for a name field, "text" for a lone text)."""
    facts = TextFacts()
    if name:
        facts.extend(_name_field(name, where.rsplit(".", 1)[0] + ".name"))
    if not text or not text.strip():
        return facts
    facts.characters |= _characters(text)
    facts.names |= {lexicon.name_key(w) for w in _CAPITALISED.findall(text)}
    facts.years += _years(text, where)
    seen_minor: set[tuple[str, str]] = set()
    first = True
    for view in views(text):
        blanked = R._blank(view, R._EXEMPT)
        cues, adult_age = R._minor_cues(blanked)
        for cue in cues:
            scope, detail = _minor_scope(cue, blanked, role)
            if cue.kind == "teen" and adult_age:
                scope, detail = "local", "a teen word for someone stated adult"
            key = (cue.evidence, scope)
            if key in seen_minor:
                continue
            seen_minor.add(key)
            subject = ""
            m = _NAME_BEFORE.search(text[max(0, cue.span[0] - 40): cue.span[0]]) if first else None
            if m is None and first:  # "her daughter Tilly, 12": the name inside the cue
                m = _NAME_INSIDE.search(text[cue.span[0]: cue.span[1]])
            if m:
                subject = lexicon.name_key(m.group(1))
            facts.minor.append(Evidence("minor", detail, cue.evidence, where, scope, subject))
        if adult_age:
            facts.adult.append(Evidence("adult", "stated adult age", "age 18 or over", where))
        facts.minor += [e for e in _indirect_ages(blanked, where) if (e.text, e.scope) not in seen_minor]
        seen_minor |= {(e.text, e.scope) for e in facts.minor}
        if not facts.sexual:
            m = R._SEXUAL.search(blanked)
            if m:
                facts.sexual.append(Evidence("sexual", "sexual term", m.group(0), where))
            elif (m := R._STANDALONE.search(blanked)) is not None:
                facts.sexual.append(Evidence("sexual", "term for sexual content of minors", m.group(0), where))
        if not facts.romantic:
            m = R._ROMANTIC.search(blanked)
            if m:
                facts.romantic.append(Evidence("romantic", "romantic term", m.group(0), where))
        if first or not facts.real:
            facts.real += _real_people(view, text, where, role, facts.characters)
        first = False
    # a real person and a sexual request in one short text: the request is about them, cast or not
    # ("напиши эротический рассказ про Путина", "the actor who played X, write him into a sex scene")
    if facts.real and (facts.sexual or _any_sexual_term(text)) and len(text.split()) <= 60:
        facts.real = [e if e.scope == "conversation" or e.detail.startswith("classifier") else
                      Evidence(e.fact, e.detail, e.text, e.where, "conversation", e.subject, e.value) for e in facts.real]
    more = _lexicon_facts(text, where)
    # what the English rules already read (with their view of dependants and backstories) stands
    seen = [e.text.lower() for e in facts.minor]
    more.minor = [e for e in more.minor if not any(e.text.lower().strip(" ()") in t for t in seen)]
    # The English rules judge "near" for English words; for another language's child or teen word
    # (중학생, Schülerin) and a sexual term in one short text, the text is the window.
    if more.minor and (more.sexual or facts.sexual) and len(text.split()) <= LEXICON_WINDOW_WORDS:
        more.minor = [Evidence(e.fact, e.detail, e.text, e.where, "conversation", e.subject, e.value)
                      if e.scope == "local" and e.detail.startswith("child or teen word") else e for e in more.minor]
    facts.extend(more)
    return facts
