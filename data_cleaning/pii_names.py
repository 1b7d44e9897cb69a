"""PERSON: people's names, by the words around them and a list of first and last names, offline.

No named-entity model is installed from a package registry here: spaCy's English pipelines are published as
release files of spaCy's own repository, not on PyPI (the PyPI names `en-core-web-trf` and friends are
placeholder packages that refuse to install, and `en-core-web-sm-*` are copies uploaded by others, whose bytes
cannot be checked against spaCy's release). A copy of en_core_web_sm measured on the labelled set of
tests/_pii_cases.py found 65% of the names and called `Thread` a person, with 323 of the demo corpus's 8,000 texts
changed. So names are found by rules, measured on the same set (docs/data_cleaning.md):

- a cue that says a name follows: "my name is", "je m'appelle", "mein Name ist", "меня зовут", Mr./Dr./Frau;
  then any capitalised words are the name;
- a weaker cue: a greeting ("Dear", "Hello", "Bonjour"), a sign-off on the line before ("Best regards,"),
  a form field ("Name:", "From:", "Customer:"), "I'm", "this is"; then the words must hold a known first or
  last name (Faker's per-locale name lists, 86 locales) and no word of code or documentation;
- no cue: a known first name followed by a known last name ("Camille Dubois").

A recipe can add a named-entity model of its own by local path (`cleaning.pii_ner_model`, `load_ner`).
"""
from __future__ import annotations

import functools
import re
import sys
from pathlib import Path
from typing import Callable, Iterable, Iterator

from .pii import Detector

# Letters that start a capitalised word, in Latin, Greek and Cyrillic scripts (re has no \p{Lu})
_UPPER = "".join(c for c in map(chr, range(0x41, 0x530)) if c.isupper() or c.istitle())
_WORD = rf"[{_UPPER}](?:[^\W\d_]|['’-](?=[^\W\d_]))+"
_PARTICLE = r"(?:de|da|di|do|dos|das|du|del|della|van|von|der|den|ter|ten|la|le|el|al|bin|ibn|y|zu)"
# in a lookahead, so that a cue whose name is rejected does not hide the next cue ("Thanks.\nCheers,\nAna")
_NAME = rf"(?=(?P<v>{_WORD}(?:[ \t]+(?:{_PARTICLE}[ \t]+){{0,2}}{_WORD}){{0,3}}))"

_STRONG_CUES = (
    r"my name is|my name's|i am called|je m'appelle|mein name ist|ich hei(?:ß|ss)e|me llamo|mi nombre es|"
    r"mi chiamo|il mio nome è|meu nome é|chamo-me|mijn naam is|ik heet|nazywam się|mam na imię|меня зовут|"
    r"jag heter|mitt namn är|jeg heter|mit navn er|benim adım|adım"
)
_TITLES = (r"Mr|Mrs|Ms|Mx|Dr|Prof|Sr|Sra|Srta|Mme|Mlle|Dott|Dott\.ssa|Sig|Sig\.ra|Dhr|Mevr|Hr|Fr")
_STRONG = re.compile(rf"(?i:(?<![\w'])(?:{_STRONG_CUES}))[ \t]+{_NAME}")
_TITLE = re.compile(rf"(?:(?<![\w.])(?:{_TITLES})\.[ \t]*|"
                    rf"(?<![\w.])(?:Herr|Frau|Miss|Madame|Monsieur|Señor|Señora|Signor|Signora|Pan|Pani)[ \t]+){_NAME}")
# pieces of which every strong cue holds one (in lower case): a text without any skips the cue scan
_STRONG_HINTS = ("name is", "name ist", "name's", "called", "appelle", "heiß", "heiss", "llamo", "nombre es",
                 "chiamo", "nome è", "nome é", "chamo", "naam is", "heet", "nazywam", "imię", "зовут", "heter",
                 "namn är", "navn er", "adım")
# every title cue starts with one of these (case as written); one regex of literals is the fastest test here
_TITLE_HINT = re.compile("|".join(re.escape(t.replace("\\", "") + ".") for t in _TITLES.split("|"))
                         + "|Herr |Frau |Miss |Madame |Monsieur |Señor|Signor|Pan |Pani ")

_GREETINGS = (
    r"dear|hello|hi|hey|good morning|good afternoon|good evening|bonjour|bonsoir|salut|cher|chère|hallo|"
    r"guten tag|liebe|lieber|sehr geehrte[rs]?|hola|querid[oa]|estimad[oa]|ciao|car[oa]|gentile|olá|beste|"
    r"geachte|dzień dobry|witaj|szanown[ya]|здравствуйте|привет|hej|kära|hei|merhaba"
)
_INTRODUCTIONS = (r"i'm|i am|this is|it's|here is|c'est|ich bin|soy|sono|sou|ik ben|jestem|это|jag är|"
                  r"(?:credited|written|authored|maintained|created|contributed|reported|signed|approved) by|"
                  r"credited to|thanks to|credits(?: also)? go to|spoke (?:with|to)|talked to|forward (?:this|it) to|"
                  r"assigned to|ask for|contact|cc")
_SIGN_OFFS = (
    r"best regards|kind regards|warm regards|regards|best wishes|all the best|best|thanks|thank you|many thanks|"
    r"cheers|sincerely|yours(?: truly| sincerely)?|cordialement|bien à vous|mit freundlichen grüßen|"
    r"viele grüße|liebe grüße|beste grüße|grüße|saludos|atentamente|un saludo|cordiali saluti|distinti saluti|"
    r"saluti|atenciosamente|abraços|met vriendelijke groet(?:en)?|groeten|pozdrawiam|z poważaniem|с уважением|"
    r"med vänliga hälsningar|hälsningar|mvh|saygılarımla"
)
_FIELDS = (
    r"name|full name|customer(?: name)?|contact(?: person)?|client|patient|employee|user|from|to|cc|"
    r"signed(?: by)?|attn|attention|assignee|reporter|nom|nombre|nome|naam|kunde|ansprechpartner|imię|имя|namn"
)
_WEAK = re.compile(
    rf"(?:(?i:(?<![\w'])(?:{_GREETINGS}))[ \t]*,?[ \t]+|(?i:(?<![\w'])(?:{_INTRODUCTIONS}))[ \t]+|"
    rf"(?i:(?<![\w'])(?:{_SIGN_OFFS}))[ \t]*[,.!]?[ \t]*\r?\n[ \t]*|(?:^|\n)[ \t]*--[ \t]*\r?\n?[ \t]*|"
    rf"[?!.][ \t]+--?[ \t]+|(?i:(?:^|\n)[ \t]*(?:{_FIELDS})[ \t]*:)[ \t]*|"
    rf"(?i:\"(?:customer_|client_|contact_|full_|display_|user_|first_|last_)?name\")[ \t]*:[ \t]*\")" + _NAME)
# the next name of a list after a cue ("Credits also go to A, B and C")
_NEXT = re.compile(rf"(?:,[ \t]*|[ \t]+(?:and|und|et|y|e|i|och|og|en)[ \t]+){_NAME}")
_CAPITALISED = re.compile(_WORD)
# in a lookahead too: "Can Valentina Russo" must be tried at "Valentina" after "Can Valentina" fails
_PAIR = re.compile(rf"(?<![\w'’-])(?=(?P<v>{_WORD}[ \t]+(?:{_PARTICLE}[ \t]+){{0,2}}{_WORD})(?![\w'’-]))")

# Capitalised words of prose and code that are also someone's first or last name somewhere: never enough,
# alone, to call a span a name (`Will Return`, `May Raise`, `True`).
_NOT_NAMES = frozenset("""
    The This That These Those There Then When Where What Which While With Will Would May Might Must Can Could
    Should Shall And But Not Nor For From Into Over Under After Before About Above Below Also Only Just Even Ever
    All Any Each Every Both Some Many Much Most More Less Few New Old Good Best Great Long Little Young Big Small
    True False None Null Mark Art August June Case Page Grant Chase Max Min Rich Hope Joy Rose Sunny Frank Bill
    Ray Park Hall Wood Stone Bell Green Brown Black White Gray Grey King Young Close Open Set Get Put Add Read
    Write Run Call Return Raise Yield Pass Break Try Use See Note Example Python Team Support Customer User
    Admin Service Services Server Client Group Company Inc Ltd Llc GmbH Foundation Software Project Office
    Monday Tuesday Wednesday Thursday Friday Saturday Sunday January February March April July September
    October November December Street Road Avenue Lane Drive Way Place Court Square
""".split())
_TECH_SUFFIXES = ("Error", "Exception", "Warning", "Type", "Class", "Object", "Handler", "Manager", "Factory",
                  "Config", "Module", "Thread", "Queue", "Event", "Parser", "Reader", "Writer", "Stream")


@functools.lru_cache(maxsize=1)
def name_lists() -> tuple[frozenset[str], frozenset[str]]:
    """(first names, last names) of every locale Faker ships, 31k and 29k entries (MIT licensed)."""
    import importlib
    import pkgutil

    import faker.providers.person as person

    first: set[str] = set()
    last: set[str] = set()
    for info in pkgutil.iter_modules(person.__path__):
        provider = importlib.import_module(f"{person.__name__}.{info.name}").Provider
        for attrs, into in ((("first_names", "first_names_male", "first_names_female", "first_names_nonbinary"),
                             first), (("last_names", "last_names_male", "last_names_female"), last)):
            for attr in attrs:
                names = provider.__dict__.get(attr)
                if isinstance(names, (dict, tuple, list, set, frozenset)):
                    into.update(n for n in names if isinstance(n, str) and len(n) > 1)
    return frozenset(first - _NOT_NAMES), frozenset(last - _NOT_NAMES)


@functools.lru_cache(maxsize=1)
def listed_names() -> frozenset[str]:
    first, last = name_lists()
    return first | last


def _words(value: str) -> list[str]:
    return [w for w in re.split(r"[ \t]+", value) if w and not re.fullmatch(_PARTICLE, w)]


def _code_like(words: list[str]) -> bool:
    return any(w.isupper() or w in _NOT_NAMES or w.endswith(_TECH_SUFFIXES) for w in words)


def _trim(m: re.Match) -> tuple[int, int, list[str]]:
    """The name's span with trailing words that are not part of a name (`Emily Carter Monday`) cut off."""
    start, end = m.span("v")
    words = _words(m.group("v"))
    while len(words) > 1 and (words[-1] in _NOT_NAMES or words[-1].isupper()):
        end = start + m.group("v").rindex(words[-1]) - 1
        words = words[:-1]
    return start, end, words


def _find_names(text: str, lower: str, ner: Callable[[str], Iterable[tuple[int, int]]] | None
                ) -> Iterator[tuple[int, int]]:
    first, last = name_lists()
    strong = []
    if _TITLE_HINT.search(text):
        strong.append(_TITLE.finditer(text))
    if any(h in lower for h in _STRONG_HINTS):
        strong.append(_STRONG.finditer(text))
    for m in (m for it in strong for m in it):
        start, end, words = _trim(m)
        if not words[0].isupper():
            yield start, end
    # every other rule needs a word of the name lists: most texts have none, and skip the cue scan
    if not listed_names().isdisjoint(_CAPITALISED.findall(text)):
        yield from _weak_names(text, first, last)
        for m in _PAIR.finditer(text):
            words = _words(m.group("v"))
            if words[0] in first and words[-1] in last and not _code_like(words):
                yield m.span("v")
    if ner is not None:
        yield from ner(text)


def _weak_names(text: str, first: frozenset[str], last: frozenset[str]) -> Iterator[tuple[int, int]]:
    for m in _WEAK.finditer(text):
        while m is not None:
            start, end, words = _trim(m)
            if _code_like(words) or not (words[0] in first or any(w in last or w in first for w in words[1:])):
                break
            yield start, end
            m = _NEXT.match(text, end)


def person_detectors(ner: Callable[[str], Iterable[tuple[int, int]]] | None = None) -> tuple[Detector, ...]:
    listed_names()  # load the lists now, not inside the first record's timing
    return (Detector("PERSON", None, None, lambda t, f: not t.islower(),
                     lambda text, f: _find_names(text, f.lower, ner)),)


def load_ner(path: str | Path) -> Callable[[str], Iterable[tuple[int, int]]]:
    """A recipe's own NER model, from a local directory: a spaCy pipeline (config.cfg) or a transformers
    token-classification model (config.json). Returns text -> spans of the person entities it finds."""
    from workbench.workspace import StageError

    path = Path(path)
    if not path.is_dir():
        raise StageError(f"cleaning.pii_ner_model {path}: no such directory")
    if (path / "config.cfg").is_file():
        try:
            import spacy
        except ImportError:
            raise StageError(f"cleaning.pii_ner_model {path} is a spaCy pipeline, but spaCy is not installed "
                             f"(`{Path(sys.executable).name} -m pip install spacy`)") from None
        nlp = spacy.load(path)
        return lambda text: [(e.start_char, e.end_char) for e in nlp(text).ents if e.label_ in {"PERSON", "PER"}]
    if (path / "config.json").is_file():
        from transformers import pipeline

        # a directory: loaded from its files, never from a hub
        ner = pipeline("token-classification", model=str(path), tokenizer=str(path), aggregation_strategy="simple",
                       device="cpu")
        labels = {label.upper() for label in ner.model.config.id2label.values()}
        if not labels & {"B-PER", "I-PER", "PER", "B-PERSON", "I-PERSON", "PERSON"}:
            raise StageError(f"cleaning.pii_ner_model {path}: the model has no person label (PER or PERSON) "
                             f"among {sorted(labels)}")
        return lambda text: [(e["start"], e["end"]) for e in ner(text)
                             if e["entity_group"].upper() in {"PER", "PERSON"}]
    raise StageError(f"cleaning.pii_ner_model {path}: neither a spaCy pipeline (config.cfg) nor a transformers "
                     "model (config.json)")
