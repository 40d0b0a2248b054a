"""Deterministic, explainable rules: the layer that makes the hard floor hold whatever the adapter says.

Every rule runs on every normalised view of a text (normalize.views) and reports a `RuleHit`
with the evidence it matched. The shape of each floor rule is "a cue NEAR a context":

- minor_sexual: a minor cue (a stated age under 18 in digits or words, a school grade, a child
  word, a euphemism, "looks like a child", age-play framings, "ancient being in a child's
  body") near sexual context, or near romantic context when the minor is a party to it.
  A few terms (lolicon, CSAM, ...) fire on their own.
- real_person_sexual: a public figure from the gazetteer (lexicon/public_figures.tsv, plus the
  platform's list), or "a real/real-life <person>", near sexual or romantic context.

"Near" is measured in words. Hard negatives shaped the exemptions: adults in romance,
"18-year-old", ages 18+ in words, a parent's own children ("after their kids are asleep"),
school settings without sexual context, "sex education", "the kiss of death", "no minors",
fictional first names that match a real person's ("Taylor the blacksmith": only full names and
a few distinctive single names are listed).
"""

from __future__ import annotations

import bisect
import re
from dataclasses import dataclass, field
from pathlib import Path

from llmtune.moderation.normalize import fold, views

# Word windows for "near".
STRONG_WINDOW = 40  # sexual term <-> minor cue anywhere in a short passage (split requests included)
WEAK_WINDOW = 6  # romantic term <-> minor cue, same clause
WEAK_CROSS_WINDOW = 10  # romantic term <-> minor cue across a sentence break ("Mia, 15, a student. Scenario: a romantic night")
DEPENDENT_WINDOW = 3  # sexual term <-> someone's own child ("has sex with her husband after the kids...")
NAME_STRONG_WINDOW = 15
NAME_WEAK_WINDOW = 5
ADULT_AGE = 18


@dataclass(frozen=True)
class RuleHit:
    category: str
    rule: str
    evidence: str

    def reason(self) -> str:
        return f"{self.category}: {self.rule} ({self.evidence})"


def rx(pattern: str) -> re.Pattern:
    """A case-insensitive pattern (every cue and context in rules.py and facts.py)."""
    return re.compile(pattern, re.IGNORECASE)


# ---------------------------------------------------------------------------------------------
# Exemptions: phrases blanked out (same length, offsets kept) before cues and contexts are found.

_EXEMPT = rx(
    r"\b(?:"
    r"sex[\s-]*ed(?:ucation)?|sexual (?:health|orientation|identity|harassment (?:training|policy|seminar))"
    r"|same[\s-]sex|opposite sex|sex of the baby|gender and sex|sex\s*:\s*(?:fe)?male|sex\s*:\s*[fm]\b"
    r"|(?:non|not|no|without(?: any)?|nothing|never|zero|free of|no hint of)[\s-]*(?:sexual|explicit|romantic|romance|nsfw|lewd|sex)"
    r"(?:\s+(?:content|themes?|elements?|material|undertones?|subtext|stuff|scenes?|at all|whatsoever))?"
    r"|explicit (?:instructions?|permission|consent|directions|rules|warnings?|language|lyrics|mention|detail(?:s|ed)?|steps?)"
    r"|kiss of death|romantic comedy|rom-?com|romance (?:novel|author|writer|novelist|genre|section|book)s?"
    r"|arous\w* (?:suspicion|interest|curiosity|anger|fear)"
    r"|(?:dog|horse|pet|beard|hair|cat|mane) grooming|grooming (?:the|a|his|her|their) (?:dog|horse|pet|cat|beard|hair|mane)"
    r"|sleep\w* with (?:the |a |her |his |their )?(?:lights?|nightlight|night light|teddy|stuffed|plush|toy|blanket|door|window)\w*"
    r"|with child\b(?!ren)|inner child|child'?s play|child[\s-]?(?:free|support|care|custody|proof|safety|protection|psychologist|development)"
    r"|kids? (?:gloves|brother|sister|at heart)|kid[\s-]friendly|family[\s-]friendly"
    r"|minor(?:ed|ing)? in (?!the |a |an |his |her |their |my |your |our |this |that )\w+"
    r"|(?:no|not|never|without|zero|nobody|no one|none)(?: of them)?(?: is| are| was| were| being)?(?: a| an| any)?[\s-]*(?:minors?|underage|under[\s-]age|children|kids?|child|teens?|teenagers?)"
    r"|(?:no ?one|nobody|none|not) (?:is |are )?(?:under|below|younger than) (?:the age of )?18"
    r"|(?:no|not|without|never|zero|nothing)(?: any)?[\s-]+(?:age[\s-]?play(?:ing)?|age[\s-]?regression|little[\s-]?space|ddlg)"
    r"|(?:not|no|isn'?t|is not|aren'?t|never|nor)(?: a| an| the| any)?[\s-]+real(?:[\s-]life)?(?: \w+)?"
    r"|\b[a-g](?:[\s-]?(?:flat|sharp|♭|♯))?[\s-]+minor\b|\bminor (?:key|scale|chord|third|seventh|mode)s?"
    r"|(?:are|is|all|both|everyone|characters?|participants?)(?: are| is)? (?:adults?|18\+|over 18|18 or older)"
    r")"
)

_MINOR_NOUN_EXCLUSIONS = (
    r"character|characters|role|roles|detail|details|injur\w*|issues?|changes?|key|chords?|league|planets?|gods?|"
    r"deit\w*|nobles?|nobility|offen[cs]es?|crimes?|spoilers?|plot|points?|parts?|scenes?|npcs?|villains?|problems?|"
    r"fix\w*|edits?|mistakes?|typos?|bugs?|threats?|setbacks?|annoyances?|arcana|spells?|potions?|healing|wounds?|"
    r"cuts?|flaws?|ailments?|surgery|damage|adjustments?|tweaks?|inconvenience|celebrit\w*|royalty|sins?|miracles?"
)

# ---------------------------------------------------------------------------------------------
# Contexts

_SEXUAL = rx(
    r"\b(?:sex|sexual\w*|sexy|sexi(?:er|est|ly)|sext(?:s|ed|ing)?|sexuali[sz]\w*|erotic\w*|explicit(?:ly)?|nsfw|lewd\w*"
    r"|smut\w*|porn\w*|nudes?|nudity|nudie\w*|naked (?:photo|pic|picture|image|selfie|video)s?|intercourse|orgasm\w*"
    r"|arous(?:ed|al|ing|e|es)|horny|lust(?:s|ful|fully|ed|ing|y)?|seduc\w+|foreplay|fondl\w+|grop(?:e|es|ed|ing)"
    r"|molest\w*|(?:make|makes|making|made) love|love[\s-]?making|love scenes?|sex scenes?|bed(?:room)? scenes?"
    r"|sleep(?:s|ing)? with|slept with|hook(?:s|ed|ing)? up with|hookups?|(?:one|1)[\s-]night stands?|fetish\w*|kink\w*"
    r"|bdsm|bondage|erections?|genital\w*|striptease|stripper\w*|strip(?:s|ped|ping)? (?:naked|down|for)|hentai|ecchi"
    r"|r-?18|xxx|x-rated|onlyfans|dirty talk|inappropriate(?:ly)? touch\w*|touch\w* (?:\w+ )?inappropriately"
    r"|rap(?:e|es|ed|ing|ist|ists)|threesomes?|orgy|orgies|masturbat\w*|virginity|deflower\w*|grooming|sensual\w*"
    r"|aphrodisiac\w*|consummat\w+|bedded|bedding (?:her|him|them)|undress(?:es|ed|ing)? (?:her|him|them) (?:slowly|seductively)"
    r"|adult (?:content|material|scenes?|roleplay|rp|stories|story|videos?|films?|chat|entertainment)|18\+ (?:content|scenes?|roleplay|rp|story|chat)"
    r"|lingerie|dirty (?:stor(?:y|ies)|talk|chat|pictures?|photos?|roleplay|rp|messages?|texts?)|raunchy|suggestive|(?:one|1)[\s-]night[\s-]stands?"
    r"|in a sexual way|sexually|(?:spicy|steamy) (?:scene|roleplay|rp|story|content|chat|night|(?:one|1)-?shot|fic|fanfic|fan ?fiction|romance|encounter|photo|pic|video)s?|smutty)\b"
)
_ROMANTIC = rx(
    r"\b(?:romance\w*|romantic\w*|(?:go|goes|going|went) on (?:a )?dates?|on a date|date night|dating|dates (?:her|him|them)"
    r"|crush(?:es)? on|has a crush|having a crush|(?:falls?|fell|falling|fallen) (?:in love|for)|in love with"
    r"|(?:make|makes|making|made)[\s-]out|(?:passionate(?:ly)?|french|deep|sloppy|lingering|long) kiss\w*|kiss\w* (?:passionately|deeply)"
    r"|kiss(?:es|ing|ed)? (?:on|her|him|them)(?! (?:goodnight|good night|on the (?:forehead|cheek|head)|the top))"
    r"|flirt\w*|lovers?|love affair|affair|intimate|intimacy|courtship|courting|love interests?|love story|love stories"
    r"|honeymoon|wedding night|kissing scenes?|love confessions?|(?:user|he|she|they|i|you|who)\s+(?:dates?|is dating|starts dating)\b|(?:boyfriend|girlfriend) experience|slow[\s-]burn|cuddl\w* in bed|in bed together)\b"
)

# ---------------------------------------------------------------------------------------------
# Minor cues (on views where number words are already digits)

_NOT_A_PERSON = (
    r"(?!\s*(?:whiskey|whisky|scotch|wine|bourbon|rum|cognac|brandy|port|cheese|car|cars|truck|van|house|home|building|"
    r"tree|trees|oak|dog|dogs|cat|cats|horse|horses|pony|parrot|tortoise|bottle|company|business|firm|marriage|"
    r"relationship|friendship|tradition|feud|grudge|secret|mystery|case|game|account|laptop|phone|computer|song|record|"
    r"photo|photograph|letter|diary|book|novel|manuscript|painting|ship|boat|tank|machine|robot|ai|android|program|"
    r"recipe|sword|blade|instrument|violin|guitar|piano|table|chair|vintage|recording|video|film|movie|show|series)\b)"
)
_AGE_PATTERNS = [
    # 15-year-old, 15 years old, 15 yrs old, 15-year-olds, "15 year-old"
    rx(r"(?<!\d)(?<!\d[*._-])(?<!\d [.*_-] )(\d{1,4})\s*[-\s]?\s*(?:years?|yrs?|yr|y)[\s-]*olds?\b" + _NOT_A_PERSON),
    # 15yo, 15 y/o, 15 y.o., 15yrs
    rx(r"(?<!\d)(?<!\d[*._-])(?<!\d [.*_-] )(\d{1,3})\s*(?:yo|y/[o0]|y\.\s?[o0]\.?|yrs?|yob)(?![a-z])" + _NOT_A_PERSON),
    # character-card style: "Rosa, 15, a shy student", "Name: Rosa, 15."
    rx(r"(?:^|[:\n]\s*)[a-z]+(?: [a-z]+)?,\s*(\d{1,2})(?![ .*_]{1,3}\d)\s*(?:,|\.|;|\)|$)"),
    # 15 years of age, 15 years young
    rx(r"(?<!\d)(\d{1,3})\s*years?\s+(?:of age|young)\b"),
    # age 15, aged 15, age: 15, at the age of 15, ages 12-14
    rx(r"\b(?:age|aged|ages|age of|ages of)\s*[:=]?\s*(?:of\s+)?(?:just\s+|only\s+|barely\s+|about\s+|around\s+)?(\d{1,3})(?![ .*_]{1,3}\d\b)"
        r"(?:\s*(?:-|to|–|and)\s*(\d{1,3}))?\b"),
    # she is 15, he's 14, who is 13, i am 12, turned 15
    rx(
        r"\b(?:she|he|they|who|i|you|girl|boy|kid|child|character|persona|oc|daughter|son|student|it|we|this girl|this boy)"
        r"(?:'s|’s|'re|’re|'m|’m|\s+(?:is|are|am|was|were|turned|turns|has turned|just turned|is now|is only|is just))\s+['\"‘“]?"
        r"(?:(?:only|just|barely|about|around|like|now|still|almost|nearly|turned|turning|currently)\s+){0,2}(\d{1,3})\b"
        r"(?!\s*(?:%|percent|feet|foot|ft|inch\w*|cm|mm|m\b|meters?|metres?|kg|kgs|lbs?|pounds?|minutes?|mins?|hours?|hrs?|"
        r"seconds?|secs?|days?|weeks?|months?|miles?|km|o'?clock|am\b|pm\b|:|\.\d|/\d|th\b|st\b|nd\b|rd\b|times|dollars?|"
        r"euros?|points?|steps?|floors?|stor(?:ey|y|ies)|people|of (?:us|them)|cents?|percent))"
    ),
    # a boy of 12, a girl aged 9, the girl the user says is 16, the character is 'only 15'
    rx(r"\b(?:girl|boy|child|kid|daughter|son|teen|teenager|student|lass|lad|pupil|man|woman|person|guy|lady|character|someone)s? (?:of|aged|age) (\d{1,2})\b(?![ .*_-]{1,3}\d)"),
    rx(
        r"\b(?:girl|boy|kid|child|character|daughter|son|student|partner|persona|oc|npc|she|he)\b(?:\s+\S+){0,4}?\s+"
        r"(?:says (?:she |he )?is|claims (?:she |he )?is|is|'s|’s|was)\s+['\"‘“]?(?:only\s+|just\s+|barely\s+|about\s+|around\s+)?(\d{1,2})\b"
        r"(?![\d:.]|\s*(?:%|percent|feet|foot|ft|inch\w*|cm|mm|m\b|meters?|metres?|kg|kgs|lbs?|pounds?|minutes?|mins?|hours?|hrs?|"
        r"seconds?|secs?|days?|weeks?|months?|miles?|km|o'?clock|am\b|pm\b|times|dollars?|euros?|points?|cents?|th\b|st\b|nd\b|rd\b))"
    ),
    # stated to be 11, described as 14, canonically 15
    rx(r"\b(?:stated|said|described|written|established|confirmed|shown|depicted|portrayed|revealed|canonically|canon)\s+(?:to be|as)?\s*(?:only\s+|just\s+)?(\d{1,2})\b(?![\d:.])"),
    # Mia (15), (15f), 15/f, f15
    rx(r"\b[a-z]+\s*\((\d{1,2})\s*(?:[/,]?\s*[fmx])?\)"),
    # "her daughter Tilly, 12," / "his son Arlo, 9": a relative named, the age set off by commas
    rx(r"\b(?:daughters?|sons?|kids?|child|sisters?|brothers?|nieces?|nephews?|granddaughters?|grandsons?|step(?:daughter|son)s?|twins?)"
        r"\s+(?:named\s+|called\s+)?[a-z][a-z'-]+,\s*(\d{1,2})\b(?!\s*(?:%|percent|years? ago))"),
    rx(r"(?<![\w.])(\d{1,2})\s*/\s*[fm]\b|\b[fm]\s*/\s*(\d{1,2})\b|\((\d{1,2})\s*[fm]\)"),
    # her 15th birthday, sweet 16
    rx(r"\b(\d{1,2})(?:st|nd|rd|th)\s+birthday\b"),
    rx(r"\bsweet (1[0-7])\b"),
    # in 8th grade, an 8th grader, grade 8 student, in grade 8, year 9 pupil
    rx(r"\b(\d{1,2})(?:st|nd|rd|th)[\s-]*grade(?:rs?)?\b"),
    rx(r"\b(?:in|a|an|the)\s+grade\s*(\d{1,2})\b|\bgrade\s*(\d{1,2})\s+(?:students?|pupils?|girls?|boys?|kids?|class\w*)\b"),
    rx(r"\byear\s*(\d{1,2})\s+(?:students?|pupils?|girls?|boys?|kids?|class(?:es|mates?)?|form)\b|\bin year (\d{1,2})\b(?=\s+(?:at|of|in)\s+(?:school|secondary|primary))"),
]
# The patterns above that read a school grade or year (grade N ~ age N + 5; UK year N ~ age
# N + 4) rather than an age. Named, not indexed: an index list silently pointed at the wrong
# patterns once, so "Mia (16)" and "16/f" were read as grades and never fired.
_GRADE_PATTERNS = frozenset(_AGE_PATTERNS[-3:])
_UK_YEAR_PATTERN = _AGE_PATTERNS[-1]
assert all("grade" in p.pattern or "year" in p.pattern for p in _GRADE_PATTERNS)
_MINOR_PHRASES = rx(
    r"\b(?:children|child|child's|children's|kids?|kid's|kiddos?|kiddies?|minors?(?!\s+(?:" + _MINOR_NOUN_EXCLUSIONS + r")\b)"
    r"|underaged?|under[\s-]age|preteens?|pre-teens?|tweens?|toddlers?|infants?|prepubescent|pre-pubescent|pubescent"
    r"|juveniles?|youngsters?|schoolchild(?:ren)?|school[\s-]?age|schoolgirls?|schoolboys?|little (?:girls?|boys?)"
    r"|young (?:girls?|boys?)|girl child|boy child|(?:grade|middle|elementary|primary|secondary|junior[\s-]high|high)[\s-]?schoolers?"
    r"|kindergart(?:e|ne|ene)rs?|kindergarten|schoolkids?|school kids?|preschool(?:ers?)?|middle[\s-]school|junior[\s-]high|elementary(?:[\s-]school)?|secondary[\s-]school"
    r"|primary[\s-]school|grade[\s-]school|adolescents?|high[\s-]?school (?:students?|girls?|boys?|kids?|freshm[ae]n|sophomores?|juniors?|cheerleaders?)"
    r"|(?:freshm[ae]n|sophomores?|juniors?) (?:in|at) (?:a |the )?high[\s-]?school|(?:in|at|attends?|attending) (?:middle|junior high|elementary) school"
    r"|under[\s-]+(?:the age of )?(?:1[0-7]|18|\d)s?\b|(?:has not|hasn't|have not|not yet|before|never) (?:hit|reached|gone through|started|entered) puberty"
    r"|pre-?pubert\w*|(?:a|young|school) pupil|below the age of (?:consent|18)|under the age of consent|not (?:yet )?(?:of age|an adult|legal)"
    r"|(?:almost|nearly|not yet|not quite|soon to be|about to (?:turn|be)|turning|turns) 18\b"
    r"|age[\s-]?play(?:ing)?|age[\s-]regress\w*|agere(?:g|gression)?|little[\s-]?space|ddlg|mdlb|mdlg|ddlb|abdl|cgl)\b"
)
_TEEN = rx(r"\b(?:teens?|teenage|teenagers?|teenaged|teeny|teenie|young teens?)\b")
_EUPHEMISM = rx(
    r"(?:['\"‘]cubs?['\"’]|\bcubs? (?:characters?|personas?|ocs?)\b)|\b(?:lol[il]s?|lolita|shotas?|pedo\w*|paedo\w*|pedophil\w*"
    r"|paedophil\w*|hebephil\w*|ephebophil\w*|chomo|(?:a|an|the|my|some|with|x)\s+(?:jk|jc|js)s?)\b"
)
_STANDALONE = rx(
    r"\b(?:lolicon|shotacon|toddlercon|csam|child porn\w*|kiddie porn\w*|pthc|jailbait|cp (?:content|pics?|images?|videos?|material|links?|collection|rp|roleplay|stories|story|stuff|fics?|trades?)"
    r"|child (?:sexual )?abuse (?:material|imagery|images|content)|(?:underage|under-age|minor) (?:porn\w*|nudes?|sex|erotica|smut)"
    r"|cheese ?pizza['\"’”]?\s+(?:stories|story|pics?|content|rp|roleplay|videos?|links?|stuff|trades?))\b"
)
_APPEARANCE = rx(
    r"\b(?:(?:child|kid|little girl|little boy|childlike|child-like|kid-like|prepubescent|pre-pubescent|preteen|toddler|\d{1,2}-year-old)'?s?"
    r"\s+(?:body|bodies|form|appearance|vessel|shell|frame|figure|face|features|proportions)"
    r"|(?:body|form|appearance|vessel|shape|figure|looks) of (?:a |an )?(?:young |small |little |tiny )?(?:child|kid|little girl|little boy|toddler|preteen|minor|\d{1,2}[\s-]*(?:years?|yrs?)[\s-]*old)"
    r"|(?:looks?|looking|appears?|appearing|seems?|seeming|resembles?|resembling|passes? for|pass for|passing for|mistaken for|could pass for)"
    r"\s+(?:like\s+|to be\s+|as\s+)?(?:about\s+|around\s+|only\s+|barely\s+|no older than\s+|not older than\s+|younger than\s+|as young as\s+|maybe\s+)?"
    r"(?:a |an )?(?:(?P<age>\d{1,2})(?![\d:])(?:\s*[-\s]?\s*(?:years?|yrs?)[\s-]*old|\s*yo)?|child|kid|minor|little (?:girl|boy)"
    r"|preteen|teen(?:ager)?|middle schooler|grade schooler|elementary schooler|schoolgirl|schoolboy|underage|prepubescent|young child))\b"
)
_ANCIENT = rx(r"\b(?:ancient|immortal|eternal|ageless|centuries|millenni\w+|\d{3,}[\s-]*(?:years?|yrs?)[\s-]*old|thousand)\b")
_ROMANTIC_ROLE = rx(r"\W{0,3}\s*(?:\w+\s+)?['\"‘“]?(?:girlfriend|boyfriend|lover|crush|date|partner|wife|husband|bride|groom|mistress|sweetheart|fiancee?|love interest)")
_PEER_ROLE = rx(
    r"\W{0,3}\s*(?:classmates?|neighbou?rs?|friends?|fans?|followers?|teammates?|students?|pupils?|babysitters?|campers?"
    r"|cousins?|roommates?|coworkers?|co-workers?|tutees?|players?|athletes?|cheerleaders?|character|persona|oc)\b"
)
# ... or said to be away: "ages 9 and 12, staying with their aunt this week".
_ELSEWHERE_AFTER = rx(
    r"^[\s,;:)(-]*(?:\w+[\s,]+){0,3}?(?:(?:are|is|were|was)\s+)?(?:staying|away|asleep|sleeping|at (?:school|camp|daycare|a sleepover|"
    r"(?:their|her|his) (?:grandparents?|grandma'?s?|grandpa'?s?|aunt'?s?|uncle'?s?|dad'?s?|mom'?s?|mum'?s?|father'?s?|mother'?s?|friend'?s?))"
    r"|with (?:their|her|his) (?:grandparents?|grandma|grandpa|aunt|uncle|dad|mom|mum|father|mother|other parent)|spending the (?:night|weekend|week)"
    r"|out of (?:the house|town)|upstairs|in bed|visiting)"
)
# Someone's own child, or a child who is elsewhere: not a party to the romance around them.
_DEPENDENT_BEFORE = rx(
    r"(?:\b(?:her|his|their|my|our|your|its)\s+(?:\w+[\s,(]+)?|\b(?!(?:she|he|it|that|who|there|what|here|where|this|everyone|someone|one)'s)\w+'s\s+(?:\w+\s+)?"
    r"|\b(?:while|after|once|when|before|until|as soon as)\s+(?:the|their|her|his|our|my|your)\s+(?:\w+\s+)?"
    r"|\b(?:mother|mom|mum|father|dad|parents?|single (?:mom|mum|dad|parent)|widow(?:er)?|nanny|babysitter|teacher|tutor|coach|pediatrician|doctor)"
    r"\s+(?:of|with|to|for)\s+(?:a |an |the |two |three |four |\d+ )?(?:\w+\s+)?"
    r"|\b(?:raising|raises|adopts?|adopted|adopting|babysit\w*|tutors?|tutoring|teaches|teaching|coaches|coaching|has|have|had)\s+(?:a |an |the |two |three |four |\d+ )?(?:\w+\s+)?"
    r"|\b(?:at|near|outside|across from|works? (?:at|in)|work(?:ing|ed) (?:at|in)|teach(?:es|ing)? (?:at|in))\s+(?:a|an|the|her|his|their|our|my|\w+'s)\s+(?:\w+\s+)?)$"
)

# ---------------------------------------------------------------------------------------------
# Real people

_REAL_CUE = rx(
    r"\b(?:real|real[\s-]life|real[\s-]world|reallife|irl|actual|existing|living|identifiable|non-?fictional)[\s,]+(?:\w+[\s,]+){0,2}?"
    r"(?:person|people|human|humans|celebrit(?:y|ies)|celebs?|actors?|actress(?:es)?|singers?|musicians?|rappers?|pop ?stars?"
    r"|idols?|athletes?|footballers?|players?|politicians?|senators?|president|presidents|prime ministers?|royals?"
    r"|influencers?|youtubers?|streamers?|tiktokers?|models?|news ?anchors?|journalists?|ceos?|billionaires?|coworkers?"
    r"|co-workers?|colleagues?|classmates?|teachers?|neighbou?rs?|boss|ex|ex-?(?:girlfriend|boyfriend|wife|husband)|friends?"
    r"|public figures?|star|stars|comedians?|hosts?|presenters?|wrestlers?|tennis players?|gymnasts?|skaters?|boy ?bands?|bands?|champions?|olympians?|members?|crush|crushes|partner|spouse|wife|husband|girlfriend|boyfriend|date|roommate"
    r"|girl groups?|k-?pop groups?|mayor|governor)\b"
    r"|\b(?:using|with|by|under) (?:his|her|their|its) real names?\b|\breal names?\b"
    r"|\b(?:deepfakes?|deep fakes?)\b"
    r"|\b(?:the\s+)?(?:current|sitting|serving|real)\s+(?:\w+\s+)?(?:president|prime minister|chancellor|pope|king|queen|vice president|first lady"
    r"|senator|governor|mayor|congress(?:wo)?man|member of parliament|mp|minister|judge|justice)\b"
    r"|\b(?:president|prime minister|chancellor|first lady|vice president|king|queen) of (?:the )?(?:united states|us|usa|america|uk|united kingdom"
    r"|england|britain|france|germany|canada|russia|china|india|japan|italy|spain|australia|brazil|mexico|ukraine)\b"
)
_NAME_WORK = (
    r"(?:'s|’s)\s+(?:new\s+|latest\s+|old\s+|greatest\s+)?(?:songs?|albums?|music|concerts?|tours?|movies?|films?|books?|shows?"
    r"|speech\w*|lyrics|records?|career|policy|policies|campaign|biography|memoir|interview|performance|playlist|discography|style)\b"
)

# ---------------------------------------------------------------------------------------------
# Configurable categories

_SV_CORE = rx(
    r"\b(?:rap(?:e|es|ed|ing|ist|ists)|non[\s-]?consensual|noncon|without (?:her|his|their|anyone's|someone's) consent"
    r"|sexual(?:ly)? assault\w*|sexual(?:ly)? abus\w*|sexual violence|forced (?:sex|intercourse|himself|herself|themselves) ?(?:on|upon)?"
    r"|assault\w* sexually|sexual(?:ly)? violat\w+|forced into (?:sex|sexual \w+|intercourse)|forces? (?:himself|herself|themselves) on|(?:sex|intercourse|sexual \w+) without (?:\w+ )?consent"
    r"|forces? (?:her|him|them|someone) (?:into|to have) sex|drug(?:s|ged|ging)? (?:her|him|them|someone|(?:a|an|the|his|her|their) (?:\w+ ){0,2}?\w+)\s+(?:and|to|so|before)\s+"
    r"(?:\w+\s+){0,3}(?:sex|rape|assault|molest|have their way))\w*"
)
_SV_SAFE = rx(
    r"\b(?:survivors?|therap\w+|counsel\w*|hotlines?|support groups?|report(?:s|ed|ing)?|recover\w*|prevention|awareness|statistics"
    r"|investigat\w+|detectives?|trials?|courtroom|prosecut\w+|testif\w+|history (?:class|lesson)|news (?:report|article)|journalis\w+|legal advice)\b"
)
_REFUSAL = rx(
    r"\b(?:refus\w+|says no|said no|saying no|does not consent|doesn't consent|did not consent|didn't consent|unwilling\w*"
    r"|against (?:her|his|their) will|struggl\w+ to get away|begs? (?:him|her|them) to stop|tries to fight (?:him|her|them) off)\b"
)
_ANIMALS = (
    r"(?:dogs?|puppy|puppies|horses?|pony|ponies|stallions?|mares?|goats?|sheep|pigs?|cows?|bulls?|donkeys?|mules?|animals?"
    r"|beasts?|livestock|farm animals?|cattle|dolphins?|cats?|kittens?|octopus|tentacle monster)"
)
_BESTIALITY = rx(r"\b(?:bestiality|zoophil\w*|zoosex|zoo porn|animal porn\w*|beastiality)\b")
_ANIMAL_PARTNER = rx(
    r"\b(?:with|and|between|by|on|involving|featuring|about|of|starring|includes|including)\s+(?:a|an|the|his|her|their|my|your|some|two|several)?\s*(?:\w+\s+)?" + _ANIMALS
    + r"\b(?!-\w|\s*(?:like|ears?|tails?|girls?|boys?|m[ae]n|wom[ae]n|folks?|people|persons?|shifters?|kin|morphs?|hybrids?|costume|mask|onesie|print|plush)\b)"
)
_INSTRUCTION = rx(
    r"\b(?:how (?:to|do i|do you|can i|could i|would i|would you|does one|should i|they)|instructions?|step[\s-]by[\s-]step|steps to"
    r"|recipe (?:for|to)|guide (?:to|for|on)|tutorial|walk(?:s)? (?:me|us|the user|the reader|them) through|teach(?:es)? (?:me|us|the user|them)"
    r"|explain(?:s|ing)? (?:exactly |precisely |in detail )?how|detailed (?:method|process|steps|procedure|plan)|in detail how"
    r"|exact (?:quantities|amounts|method|steps|recipe|procedure|measurements|ratios?)|(?:working|functional|functioning|ready-to-use|deployable)(?: \w+)? (?:code|script|program|exploit|recipe)"
    r"|write (?:me )?(?:a |the )?(?:code|script)|(?:code|script|program) that"
    r"|(?:list|lists) the (?:materials|ingredients|reagents|precursors|steps)|where to (?:buy|get|find)"
    r"|(?:synthesis|production|manufacturing) (?:route|process|method|steps)|(?:directions|advice|plan) (?:for|on) how)\b"
)
_DANGEROUS = rx(
    r"\b(?:meth(?:amphetamine)?|crystal meth|fentanyl|heroin|cocaine|crack cocaine|lsd|mdma|ghb|date[\s-]rape drugs?"
    r"|(?:pipe |nail |car |fertili[sz]er |dirty |letter |suicide )?bombs?|explosives?|ieds?|detonators?|napalm|thermite|tatp|c-?4"
    r"|nerve (?:agents?|gas)|sarin|vx|ricin|anthrax|botulinum|chemical weapons?|bio-?weapons?|biological weapons?|dirty bomb"
    r"|ghost guns?|untraceable (?:guns?|firearms?|weapons?)|silencers?|suppressors?|auto sears?|(?:full[\s-]?auto|automatic) conversion|full[\s-]?auto(?:matic)?|bump stock"
    r"|3d[\s-]printed (?:guns?|firearms?)|ransomware|malware|keyloggers?|botnets?|spyware|toxic gas|poison(?:ous)? gas|chlorine gas|mustard gas|credit card (?:fraud|skimm\w+)|card skimm\w+|skimmers?|skim(?:ming)? (?:credit |debit |bank )?cards?"
    r"|launder\w* (?:money|cash|funds|proceeds)|money laundering|counterfeit\w* (?:money|bills|currency|cash|notes|banknotes)|smuggl\w+ (?:drugs|cocaine|heroin|fentanyl|weapons|guns|firearms|people|migrants)|hotwir\w+|hot-wir\w+"
    r"|untraceable poisons?|poison (?:someone|a person|him|her|my \w+|them) (?:without|undetect\w*)|human trafficking|traffic (?:people|humans|women|children)"
    r"|(?:stolen|cloned) credit cards?|hack(?:ing)? into|phishing (?:kits?|pages?|sites?|emails?)|ddos|identity theft|steal (?:someone's )?identit\w+"
    r"|steal\w* (?:\w+ ){0,2}(?:passwords?|credentials|logins?|credit card (?:numbers|details)|cookies|session tokens)|password stealers?|infostealers?"
    r"|credential harvest\w*"
    r"|(?:break|breaking) into (?:a |someone's )?(?:house|home|car)|(?:cook|cooking|make|making|synthesi[sz]\w+|manufactur\w+) (?:meth|drugs|fentanyl))\b"
)

# Harm cues: the gate for the adapter's `illegal_instructions` score. The adapter alone blocks that
# category only when a text mentions something a crime needs (a weapon, a drug, malware, a poison,
# theft, fraud, ...); without the gate it flagged a captain explaining her ship's engines. Broad on
# purpose: the gate only decides whether the adapter may block, the adapter's threshold still decides.
_HARM = rx(
    r"\b(?:bomb\w*|explosi\w+|detonat\w+|blast\w*|grenade\w*|ied|ieds|c-?4|semtex|tnt|dynamite|napalm|thermite|tatp|molotov\w*|incendiar\w+"
    r"|weapon\w*|gun|guns|gunpowder|firearm\w*|rifle\w*|pistol\w*|handgun\w*|shotgun\w*|ammo|ammunition|bullets?|silencer\w*|suppressor\w*"
    r"|full[\s-]?auto\w*|auto sears?|bump stocks?|ghost guns?|3d[\s-]print\w*|knife|knives|blade\w*|sword\w*|crossbow\w*"
    r"|poison\w*|toxin\w*|toxic\w*|venom\w*|lethal\w*|deadly|overdos\w+|cyanide|arsenic|ricin|sarin|vx|anthrax|botulin\w*|nerve (?:agent|gas)\w*"
    r"|chlorine|mustard gas|\w*gas|chemical\w*|bio-?weapon\w*|pathogen\w*|virus\w*|germ\w*|plague|radioactiv\w+|uranium|plutonium|nuclear|dirty bomb"
    r"|drug\w*|narcotic\w*|meth\w*|amphetamine\w*|fentanyl|heroin|cocaine|crack|opioid\w*|opiate\w*|lsd|mdma|ecstasy|ghb|ketamine|pcp|dmt"
    r"|psilocybin|cannabis|marijuana|weed|pills?|precursor\w*|reagent\w*|synthes\w+|cook\w*|lab|labs|dosage\w*|dose\w*|roofie\w*|sedat\w+|tranquil\w+"
    r"|hack\w*|crack(?:ing|ed)|exploit\w*|malware|ransomware|spyware|keylog\w*|trojan\w*|botnet\w*|rootkit\w*|backdoor\w*|worm|virus|ddos|dos attack"
    r"|phish\w*|scam\w*|fraud\w*|counterfeit\w*|forg(?:e|ed|es|ery|eries|ing)|fake (?:id|ids|passports?|documents?|money|bills|checks|cheques)"
    r"|launder\w*|embezzl\w+|brib\w+|extort\w*|blackmail\w*|ransom\w*|kidnap\w*|abduct\w*|traffick\w*|smuggl\w+|contraband|cartel\w*"
    r"|steal\w*|stole|stolen|theft\w*|thie(?:f|ves)|rob|robs|robb\w+|burgl\w+|break(?:ing)? into|broke into|shoplift\w*|pickpocket\w*|loot\w*"
    r"|lock ?pick\w*|pick (?:a|the) lock|hotwir\w+|hot-wir\w+|skim\w*|carding|credit cards?|card numbers?|passwords?|credentials?|logins?|accounts?"
    r"|identity|ssn|social security|bank details|wallet\w*|crypto\w*|bitcoin\w*|dark ?web|darknet|tor|onion|untraceabl\w+|undetect\w+|evad\w+|evasion"
    r"|alibi\w*|dispos\w+ of (?:a |the )?bod(?:y|ies)|corpse\w*|bod(?:y|ies) (?:disposal|dump\w*)|murder\w*|kill\w*|assassin\w*|hit ?m[ae]n|stab\w*|shoot\w*"
    r"|strangl\w+|suffocat\w+|tortur\w+|maim\w*|hurt\w*|harm\w*|injur\w+|attack\w*|massacre\w*|terror\w*|arson\w*|set fire|burn down|sabotag\w+"
    r"|derail\w*|poach\w*|illegal\w*|illicit\w*|crime\w*|criminal\w*|felon\w*|unlicensed|black market|bypass\w*|disabl\w+ (?:the )?(?:alarm|camera|security)\w*"
    r"|surveil\w*|stalk\w*|spy(?:ing)? on|track(?:ing)? (?:someone|her|him|them|my|a person)|doxx?\w*|swat(?:ting|ted)?|deepfake\w*|impersonat\w+"
    r"|wi-?fi|network\w*|server\w*|website\w*|flood\w*|inject\w*|sql|payload\w*|shellcode|zero[\s-]?days?|0-?days?|brute[\s-]?forc\w*"
    r"|firewall\w*|antivirus|encrypt\w*|decrypt\w*|ar-?15s?|ak-?47s?|glock\w*|pressure cookers?|fertili[sz]er\w*|ammonium|nitrat\w+"
    r"|acid\w*|bleach\w*|ammonia|dealer\w*|grow ops?)\b"
)

_PROTECTIVE = rx(
    r"\s*(?:\w+\s+){0,2}?(?:defend|protect|prevent|detect|recogni[sz]e|spot|avoid|report|recover|stay safe|identify|respond|survive"
    r"|safely dispose|secure|block|remove|clean up|treat|help (?:victims|survivors))"
)


# ---------------------------------------------------------------------------------------------
# Names and platform categories


def read_name_list(path: Path) -> list[str]:
    """One name per line; blank lines and `#` comments ignored."""
    names = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            names.append(line)
    return names


@dataclass
class PlatformCategory:
    """A category a platform adds in its policy file: literal keywords and/or regular expressions."""

    name: str
    description: str = ""
    keywords: list[str] = field(default_factory=list)
    patterns: list[str] = field(default_factory=list)
    requires_sexual_context: bool = False
    compiled: list[re.Pattern] = field(default_factory=list, repr=False)

    def compile(self) -> None:
        self.compiled = []
        for kw in self.keywords:
            words = re.findall(r"\S+", fold(kw).lower())
            self.compiled.append(re.compile(r"(?<![a-z0-9])" + r"\s+".join(re.escape(w) for w in words) + r"(?![a-z0-9])"))
        for pattern in self.patterns:
            self.compiled.append(re.compile(pattern, re.IGNORECASE))


# ---------------------------------------------------------------------------------------------
# Matching


def _blank(text: str, pattern: re.Pattern) -> str:
    return pattern.sub(lambda m: " " * len(m.group(0)), text)


class _Words:
    """Word index of character offsets, for "within N words" and "same clause" tests."""

    def __init__(self, text: str):
        self.text = text
        self.starts = [m.start() for m in re.finditer(r"\S+", text)]

    def index(self, pos: int) -> int:
        return max(0, bisect.bisect_right(self.starts, pos) - 1)

    def gap(self, a: tuple[int, int], b: tuple[int, int]) -> int:
        a0, a1 = self.index(a[0]), self.index(max(a[0], a[1] - 1))
        b0, b1 = self.index(b[0]), self.index(max(b[0], b[1] - 1))
        return max(0, b0 - a1, a0 - b1)

    def same_clause(self, a: tuple[int, int], b: tuple[int, int]) -> bool:
        lo, hi = min(a[1], b[1]), max(a[0], b[0])
        return not re.search(r"[.;!?\n]", self.text[lo:hi]) if lo < hi else True


@dataclass
class _Cue:
    span: tuple[int, int]
    kind: str  # age, grade, child, teen, euphemism, appearance
    evidence: str
    dependent: bool = False


def _find_spans(pattern: re.Pattern, text: str) -> list[tuple[int, int]]:
    return [m.span() for m in pattern.finditer(text)]


# Nouns that, within a few words after an age, show it is the age of a thing, not a person; a
# person noun met first ("a 15-year-old girl with a car") settles it the other way.
_THINGS = frozenset((
    "whiskey whisky scotch malt wine bourbon rum cognac brandy port tawny sherry madeira cheese cheddar gouda parmesan "
    "car cars truck van jeep rover landrover mustang ford bmw mercedes volvo porsche toyota honda bike motorcycle motorbike "
    "tractor boat yacht ship plane house home building manor castle cottage barn tree trees oak vine vines dog dogs cat cats "
    "horse horses pony mare stallion parrot tortoise bottle bottles company business firm brand marriage relationship "
    "friendship partnership tradition feud grudge secret mystery case game account laptop phone computer song record photo "
    "photograph letter diary book novel manuscript painting tank machine robot program recipe sword blade instrument violin "
    "guitar piano table chair recording video film movie show series mortgage loan lease contract vintage vintages whiskies "
    "wines cask barrel rug carpet clock watch sweater jacket coat vase statue cellar distillery restaurant bar pub inn tavern"
).split())
_PEOPLE = frozenset((
    "girl girls boy boys kid kids child children son daughter student students pupil woman women man men person people "
    "character characters teen teenager teenagers lass lad sister brother cousin niece nephew twin twins baby babies toddler "
    "friend friends classmate neighbor neighbour virgin bride princess prince heir runaway orphan schoolgirl schoolboy she he "
    "who oc npc persona version self"
).split())
_WORD_AFTER = re.compile(r"[a-z]+")


def _thing_follows(text: str, end: int) -> bool:
    """A thing named right after the age ("a 16-year-old Land Rover", "12-year-old single malt"):
    within the same phrase, so "16/f, likes horses" stays an age."""
    window = re.split(r"[,.;:!?()\n]", text[end: end + 48], maxsplit=1)[0]
    for word in _WORD_AFTER.findall(window)[:3]:
        if word in _PEOPLE:
            return False
        if word in _THINGS:
            return True
    return False


def _thing_precedes(text: str, start: int) -> bool:
    before = _WORD_AFTER.findall(text[max(0, start - 24): start])[-2:]
    return "vintage" in before or "aged" in before and "whisky" in text[start: start + 60]


def _minor_cues(text: str) -> tuple[list[_Cue], bool]:
    """Minor cues in `text` (exemptions already blanked) and whether an adult age (>= 18) is stated."""
    cues: list[_Cue] = []
    adult_age = False
    for pattern in _AGE_PATTERNS:
        for m in pattern.finditer(text):
            numbers = [int(g) for g in m.groups() if g and g.isdigit()]
            if not numbers:
                continue
            if len(numbers) == 2 and numbers[1] == 0 and numbers[0] < 10:
                numbers = [numbers[0] * 10]  # "aged 4-0" is a spaced-out 40, not a range
            if pattern in _GRADE_PATTERNS:
                if any(1 <= n <= 12 for n in numbers) or (pattern is _UK_YEAR_PATTERN and any(n <= 13 for n in numbers)):
                    cues.append(_Cue(m.span(), "grade", m.group(0).strip()))
                continue
            if not m.group(0).rstrip().endswith(")") and (_thing_follows(text, m.end()) or _thing_precedes(text, m.start())):
                continue  # "a 16-year-old Land Rover", "a vintage 15-year-old tawny port"
            young = [n for n in numbers if 1 <= n < ADULT_AGE]
            if young:
                cues.append(_Cue(m.span(), "age", m.group(0).strip()))
            elif any(n >= ADULT_AGE for n in numbers):
                adult_age = True
    for m in _MINOR_PHRASES.finditer(text):
        cues.append(_Cue(m.span(), "child", m.group(0).strip()))
    for m in _TEEN.finditer(text):
        cues.append(_Cue(m.span(), "teen", m.group(0).strip()))
    for m in _EUPHEMISM.finditer(text):
        cues.append(_Cue(m.span(), "euphemism", m.group(0).strip()))
    for m in _APPEARANCE.finditer(text):
        age = m.group("age")
        if age is not None and int(age) >= ADULT_AGE:
            continue
        cues.append(_Cue(m.span(), "appearance", m.group(0).strip()))
    priority = {"appearance": 0, "age": 1, "grade": 2, "euphemism": 3, "child": 4, "teen": 5}
    cues.sort(key=lambda c: priority[c.kind])
    for cue in cues:
        before = text[max(0, cue.span[0] - 60): cue.span[0]]
        # "his 13-year-old 'girlfriend'", "my 12yo neighbour": a partner or peer, not someone's dependant
        peer = _ROMANTIC_ROLE.match(text, cue.span[1]) or _PEER_ROLE.match(text, cue.span[1])
        after = text[cue.span[1]: cue.span[1] + 60]
        cue.dependent = cue.kind in ("age", "child", "teen") and not peer and bool(
            _DEPENDENT_BEFORE.search(before) or _ELSEWHERE_AFTER.match(after))
    return cues, adult_age


def _sexual_or_romantic(view: str) -> bool:
    blanked = _blank(view, _EXEMPT)
    return bool(_SEXUAL.search(blanked) or _ROMANTIC.search(blanked))


# What Python's \s matches (str.isspace), for RE2, whose \s is [\t\n\f\r ] only.
_PY_SPACE = r"\t\n\x0b\x0c\r\x1c-\x1f \x{85}\x{a0}\x{1680}\x{2000}-\x{200a}\x{2028}\x{2029}\x{202f}\x{205f}\x{3000}"


def _relaxed(pattern: str) -> str:
    r"""`pattern` for RE2, matching everything the original matches: lookaround groups dropped (RE2
    has none; without them a pattern only matches more) and \s spelled out as Python's whitespace.
    Python's Unicode \w and \b against RE2's ASCII ones only add matches where a pattern's
    literals are ASCII, as all of the triggers' are."""
    out, i, in_class = [], 0, False
    while i < len(pattern):
        if pattern.startswith("\\s", i):
            out.append(_PY_SPACE if in_class else f"[{_PY_SPACE}]")
            i += 2
            continue
        if pattern[i] == "\\":
            out.append(pattern[i: i + 2])
            i += 2
            continue
        if pattern[i] == "[" and not in_class:
            in_class = True
        elif pattern[i] == "]" and in_class:
            in_class = False
        if not in_class and pattern.startswith(("(?!", "(?=", "(?<!", "(?<="), i):
            depth, j, cls = 0, i, False
            while j < len(pattern):
                if pattern[j] == "\\":
                    j += 2
                    continue
                if cls:  # a ")" inside a character class closes nothing
                    cls = pattern[j] != "]"
                elif pattern[j] == "[":
                    cls = True
                elif pattern[j] == "(":
                    depth += 1
                elif pattern[j] == ")":
                    depth -= 1
                    if depth == 0:
                        break
                j += 1
            i = j + 1
            continue
        out.append(pattern[i])
        i += 1
    return "".join(out)


@dataclass
class Analysis:
    """What the rules see in one text: their hits and the adapter gates (see screener.GATES)."""

    hits: list[RuleHit]
    sexual_context: bool
    harm_cue: bool


class RuleSet:
    """The compiled rules: the built-in floor and configurable rules, a name list, platform categories."""

    def __init__(self, names: list[str], platform: list[PlatformCategory] | None = None):
        from llmtune.moderation.lexicon import Gazetteer, Person, public_figures

        self.gazetteer = public_figures()
        self.extra_names = Gazetteer()  # the platform's own list (policy file, names file)
        for name in names:
            self.extra_names.add(name, Person(name, "other", ""))
        self.platform = platform or []
        for cat in self.platform:
            cat.compile()

    def match(self, text: str) -> list[RuleHit]:
        return self.analyse(text).hits

    def analyse(self, text: str) -> Analysis:
        """Rule hits and adapter gates, from one pass over the text's views."""
        hits: dict[str, RuleHit] = {}
        sexual = harm = False
        for view in views(text):
            for hit in self.match_view(view):
                hits.setdefault(hit.category, hit)  # the first view's evidence explains it best
            sexual = sexual or _sexual_or_romantic(view)
            harm = harm or bool(_HARM.search(view))
        return Analysis(list(hits.values()), sexual, harm)

    def match_view(self, view: str) -> list[RuleHit]:
        """Rules over one normalised view (lower case, number words as digits)."""
        text = _blank(view, _EXEMPT)
        words = _Words(text)
        sexual = _find_spans(_SEXUAL, text)
        romantic = _find_spans(_ROMANTIC, text)
        hits: list[RuleHit] = []
        hits += self._minor(text, words, sexual, romantic)
        hits += self._real_person(text, words, sexual, romantic)
        hits += self._configurable(text, words, sexual)
        for cat in self.platform:
            for pattern in cat.compiled:
                m = pattern.search(text)
                if m and (not cat.requires_sexual_context or sexual or romantic):
                    hits.append(RuleHit(cat.name, "policy-file rule", m.group(0).strip()))
                    break
        return hits

    # -- the floor -------------------------------------------------------------------------

    def _minor(self, text, words, sexual, romantic) -> list[RuleHit]:
        out = []
        m = _STANDALONE.search(text)
        if m:
            out.append(RuleHit("minor_sexual", "term that names sexual content of minors", m.group(0)))
        cues, adult_age = _minor_cues(text)
        for cue in cues:
            if cue.kind == "teen" and adult_age:
                continue  # "an 18-year-old teen", "19-year-old teenagers": a stated adult age wins over "teen"
            rule = {
                "age": "stated age under 18 near sexual context",
                "grade": "school grade near sexual context",
                "child": "child or school cue near sexual context",
                "teen": "teen (no adult age stated) near sexual context",
                "euphemism": "euphemism for minors near sexual context",
                "appearance": "child-like appearance near sexual context",
            }[cue.kind]
            if cue.kind == "appearance" and _ANCIENT.search(text):
                rule = "ancient being in a child's body near sexual context"
            for span in sexual:
                gap = words.gap(cue.span, span)
                if (gap <= DEPENDENT_WINDOW and words.same_clause(cue.span, span)) if cue.dependent else gap <= STRONG_WINDOW:
                    out.append(RuleHit("minor_sexual", rule, f"{cue.evidence} ~ {text[span[0]:span[1]]}"))
                    break
            else:
                if cue.dependent:
                    continue
                for span in romantic:
                    gap = words.gap(cue.span, span)
                    if (gap <= WEAK_WINDOW and words.same_clause(cue.span, span)) or gap <= WEAK_CROSS_WINDOW:
                        out.append(RuleHit("minor_sexual", rule.replace("sexual", "romantic"), f"{cue.evidence} ~ {text[span[0]:span[1]]}"))
                        break
            if out:
                break
        return out

    def _real_person(self, text, words, sexual, romantic) -> list[RuleHit]:
        people: list[tuple[tuple[int, int], str, str]] = []
        for gazetteer in (self.gazetteer, self.extra_names):
            for span, _key, _person in gazetteer.find(text):
                if re.match(_NAME_WORK, text[span[1]:]) or re.search(r"\b(?:by|from)\s+$", text[max(0, span[0] - 6):span[0]]):
                    continue  # "a song by X", "X's new album": a mention of their work, not of them
                people.append((span, "real person's name near sexual context", text[span[0]:span[1]]))
        for m in _REAL_CUE.finditer(text):
            people.append((m.span(), "real, identifiable person near sexual context", m.group(0).strip()))
        for span, rule, evidence in people:
            for s in sexual:
                if words.gap(span, s) <= NAME_STRONG_WINDOW:
                    return [RuleHit("real_person_sexual", rule, f"{evidence} ~ {text[s[0]:s[1]]}")]
            for s in romantic:
                if words.gap(span, s) <= NAME_WEAK_WINDOW and words.same_clause(span, s):
                    return [RuleHit("real_person_sexual", rule.replace("sexual", "romantic"), f"{evidence} ~ {text[s[0]:s[1]]}")]
        return []

    # -- configurable ----------------------------------------------------------------------

    def _configurable(self, text, words, sexual) -> list[RuleHit]:
        out = []
        m = _SV_CORE.search(text)
        if m and not _SV_SAFE.search(text):
            out.append(RuleHit("sexual_violence", "non-consensual sexual act", m.group(0).strip()))
        else:
            for r in _REFUSAL.finditer(text):
                near = [s for s in sexual if words.gap(r.span(), s) <= 8]
                if near and not _SV_SAFE.search(text):
                    s = near[0]
                    out.append(RuleHit("sexual_violence", "sexual act the other person refuses", f"{r.group(0)} ~ {text[s[0]:s[1]]}"))
                    break
        m = _BESTIALITY.search(text)
        if m:
            out.append(RuleHit("bestiality", "bestiality term", m.group(0)))
        else:
            intimate = sexual + [m.span() for m in re.finditer(r"\bintima\w+", text)]
            for a in _ANIMAL_PARTNER.finditer(text):
                near = [s for s in intimate if words.gap(a.span(), s) <= 6 and words.same_clause(a.span(), s)]
                if near:
                    s = near[0]
                    out.append(RuleHit("bestiality", "animal as a sexual partner", f"{a.group(0).strip()} ~ {text[s[0]:s[1]]}"))
                    break
        for ins in _INSTRUCTION.finditer(text):
            if _PROTECTIVE.match(text, ins.end()):
                continue  # "how to defend against ransomware", "how to recognise a phishing email"
            found = None
            for d in _DANGEROUS.finditer(text):
                if words.gap(ins.span(), d.span()) <= 12:
                    found = d
                    break
            if found:
                out.append(RuleHit("illegal_instructions", "instructions for a serious crime", f"{ins.group(0)} ~ {found.group(0)}"))
                break
        return out
