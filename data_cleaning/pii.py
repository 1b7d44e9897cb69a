"""PII scrubbing: find e-mails, phones, IP addresses, card numbers, IBANs, API keys/tokens, national ID numbers,
keyword-context secrets (`password = ...`, private keys), people's names and street addresses, and replace each
with a typed placeholder carrying a salted hash, `<EMAIL_3f2a>`.

Equal values get equal placeholders (so a conversation that mentions one address twice stays coherent and
duplicates stay duplicates), while the value itself cannot be read back without the salt. Candidates
found by a regex are confirmed by a checksum or parser where one exists (Luhn for cards, mod-97 for
IBANs, `ipaddress` for IPs, python-stdnum for national IDs, phonenumbers for phones), which keeps version
numbers, dates and slices in code out of the net. The detectors of the later kinds live next to this
module (`pii_ids`, `pii_secrets`, `pii_names`, `pii_addresses`); `PII_TYPES` says which types there are,
and a scrubber runs only the types it is given.
"""
from __future__ import annotations

import functools
import hashlib
import hmac
import ipaddress
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Iterable

PLACEHOLDER_HEX = 4  # hash characters in a placeholder, as in <EMAIL_3f2a>
PLACEHOLDER_RE = re.compile(r"<[A-Z][A-Z0-9_]*_[0-9a-f]{%d}>" % PLACEHOLDER_HEX)
_PLACEHOLDER_TYPE_RE = re.compile(r"<([A-Z][A-Z0-9_]*)_[0-9a-f]{%d}>" % PLACEHOLDER_HEX)


def without_salt(text: str) -> str:
    """text with each placeholder's salted hash dropped, `<EMAIL_3f2a>` -> `<EMAIL>`: the same under any salt."""
    return _PLACEHOLDER_TYPE_RE.sub(r"<\1>", text)

_EMAIL = re.compile(r"(?<![\w.+-])[A-Za-z0-9][A-Za-z0-9._%+-]{0,63}@(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,24}(?![\w-])")
# Prefixed secrets: the prefix alone says what it is, so no entropy test is needed.
_API_KEY_PREFIXED = re.compile(
    r"(?<![\w-])(?:"
    r"sk-(?:proj-|live-|test-)?[A-Za-z0-9_-]{20,}"
    r"|(?:sk|pk|rk)_(?:live|test)_[A-Za-z0-9]{16,}"
    r"|gh[pousr]_[A-Za-z0-9]{30,}"
    r"|github_pat_[A-Za-z0-9_]{40,}"
    r"|glpat-[A-Za-z0-9_-]{20,}"
    r"|xox[abposr]-[A-Za-z0-9-]{10,}"
    r"|(?:AKIA|ASIA)[0-9A-Z]{16}"
    r"|AIza[0-9A-Za-z_-]{35}"
    r"|hf_[A-Za-z0-9]{30,}"
    r"|eyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}"
    r")(?![\w-])"
)
# Unprefixed high-entropy strings: long, mixing upper, lower and digits, near-random character spread.
_TOKEN_CANDIDATE = re.compile(r"(?<![\w+/-])[A-Za-z0-9_+/-]{32,}={0,2}(?![\w+/=-])")
_IBAN = re.compile(r"(?<![A-Za-z0-9])[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,3})?(?![A-Za-z0-9])")
_CARD = re.compile(r"(?<![\w.-])\d(?:[ -]?\d){12,18}(?![\w-]|\.\d)")
_IPV6 = re.compile(r"(?<![\w:.])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?![\w:])")
_IPV4 = re.compile(r"(?<![\w.])(?:\d{1,3}\.){3}\d{1,3}(?![\w]|\.\d)")
_PHONE = re.compile(
    r"(?<![\w+])(?:"
    r"\+\d{1,3}[ .-]?(?:\(\d{1,4}\)[ .-]?)?\d{1,4}(?:[ .-]\d{2,4}){1,4}"  # international: +44 20 7946 0958
    r"|\(\d{3}\)[ .-]?\d{3}[ .-]\d{4}"  # (212) 555-0199
    r"|\d{3}[.-]\d{3}[.-]\d{4}"  # 415-555-0137
    r")(?![\w-]|\.\d)"
)


def luhn_ok(digits: str) -> bool:
    total, parity = 0, len(digits) % 2
    for i, ch in enumerate(digits):
        d = ord(ch) - 48
        if i % 2 == parity:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


def iban_ok(value: str) -> bool:
    s = value.replace(" ", "")
    if not 15 <= len(s) <= 34:
        return False
    rearranged = s[4:] + s[:4]
    try:
        number = int("".join(str(int(ch, 36)) for ch in rearranged))
    except ValueError:
        return False
    return number % 97 == 1


def _ipv6_ok(value: str) -> bool:
    # at least two written groups: "::2" in a slice or "a::b" in prose is not an address worth scrubbing
    if sum(1 for g in value.split(":") if g) < 2:
        return False
    try:
        ipaddress.IPv6Address(value)
    except ValueError:
        return False
    return True


def _ipv4_ok(value: str) -> bool:
    try:
        ipaddress.IPv4Address(value)
    except ValueError:
        return False
    return True


def _card_ok(value: str) -> bool:
    digits = value.replace(" ", "").replace("-", "")
    # a single repeated digit (0000 0000 ...) passes Luhn but is filler, not a card
    return 13 <= len(digits) <= 19 and len(set(digits)) > 1 and luhn_ok(digits)


def shannon_entropy(s: str) -> float:
    n = len(s)
    return -sum(c / n * math.log2(c / n) for c in Counter(s).values())


def _high_entropy_token(value: str) -> bool:
    core = value.strip("=")
    if len(core) < 32:
        return False
    has = (any(c.isupper() for c in core), any(c.islower() for c in core), any(c.isdigit() for c in core))
    if not all(has):
        return False  # hex digests and identifiers lack one class; real keys mix all three
    if sum(c.isdigit() for c in core) < 4:
        return False  # CamelCaseIdentifiersLikeThisOne have letters only
    return shannon_entropy(core) >= 4.2


class TextFacts:
    """Cheap facts about a text that rule detectors out before their (slow) regex scans it. The digit count
    and the lower-cased text are worked out on first use: a scrubber without the detectors that ask for them
    does not pay for them."""

    __slots__ = ("text", "longest_word", "has_at", "has_3_digits", "__dict__")

    def __init__(self, text: str):
        self.text = text
        self.longest_word = max(map(len, text.split()), default=0)
        self.has_at = "@" in text
        self.has_3_digits = _DIGITS3.search(text) is not None

    @classmethod
    def of(cls, text: str) -> "TextFacts":
        return cls(text)

    @functools.cached_property
    def digits(self) -> int:
        """How many digit characters, anywhere."""
        return sum(map(self.text.count, "0123456789"))

    @functools.cached_property
    def lower(self) -> str:
        """The text in lower case, for keyword hints."""
        return self.text.lower()


@dataclass(frozen=True)
class Detector:
    """One kind of value. A pattern with a group named `v` replaces only that group (the context around it,
    `password = ` or `My name is `, stays); `find` instead of a pattern yields (start, end) spans itself."""

    type: str
    pattern: re.Pattern | None
    confirm: Callable[[str], bool] | None = None
    # None = always scan; else scan only when this says a match is possible (never a false "no")
    may_match: Callable[[str, TextFacts], bool] | None = None
    # (text, the facts of the text before any detector ran) -> spans
    find: Callable[[str, TextFacts], Iterable[tuple[int, int]]] | None = None
    # like confirm, for a rule that needs the whole match (which alternative or cue matched)
    confirm_match: Callable[[re.Match], bool] | None = None


_KEY_PREFIXES = ("sk-", "sk_", "pk_", "rk_", "ghp_", "gho_", "ghu_", "ghs_", "ghr_", "github_pat_", "glpat-",
                 "xox", "AKIA", "ASIA", "AIza", "hf_", "eyJ")
_DIGITS3 = re.compile(r"\d{3}")
_DIGITS4 = re.compile(r"\d{4}")
_IBAN_HINT = re.compile(r"[A-Z]{2}\d\d")
_IPV4_HINT = re.compile(r"\d\.\d{1,3}\.\d")
_IPV6_HINT = re.compile(r"[0-9A-Fa-f]:[0-9A-Fa-f]{0,4}:")


# Order matters: a span taken by an earlier detector is not looked at by later ones (an IBAN's digits
# must not be read as a card; an API key is not also a high-entropy token).
BUILTIN_DETECTORS = (
    Detector("EMAIL", _EMAIL, None, lambda t, f: f.has_at),
    # the shortest prefixed key (xoxb- plus 10) is 15 characters with no space inside, and every one
    # starts with a known prefix (substring tests are far cheaper than the regex)
    Detector("API_KEY", _API_KEY_PREFIXED, None,
             lambda t, f: f.longest_word >= 15 and any(p in t for p in _KEY_PREFIXES)),
    Detector("IBAN", _IBAN, iban_ok, lambda t, f: _IBAN_HINT.search(t) is not None),
    # every card layout (4-4-4-4, 4-6-5, 15/16 digits run together) has a group of four digits
    Detector("CREDIT_CARD", _CARD, _card_ok, lambda t, f: f.has_3_digits and _DIGITS4.search(t) is not None),
    Detector("IPV6", _IPV6, _ipv6_ok, lambda t, f: _IPV6_HINT.search(t) is not None),
    Detector("IPV4", _IPV4, _ipv4_ok, lambda t, f: _IPV4_HINT.search(t) is not None),
    # every phone layout matched has a group of at least three digits
    Detector("PHONE", _PHONE, None, lambda t, f: f.has_3_digits),
    Detector("API_KEY", _TOKEN_CANDIDATE, _high_entropy_token, lambda t, f: f.longest_word >= 32),
)

# Every type a built-in detector emits, in the order the report lists them.
PII_TYPES = ("EMAIL", "PHONE", "IPV4", "IPV6", "CREDIT_CARD", "IBAN", "API_KEY", "NATIONAL_ID", "SECRET",
             "PERSON", "ADDRESS")
DEFAULT_PHONE_REGIONS = ("US", "GB", "DE", "FR")


def builtin_detectors(types: frozenset[str], phone_regions: tuple[str, ...] = DEFAULT_PHONE_REGIONS,
                      ner: Callable[[str], Iterable[tuple[int, int]]] | None = None) -> tuple[Detector, ...]:
    """The built-in detectors of the given types, in the order they must run.

    Secrets go first: a private key's body or a password's value must be taken whole before the token and
    phone rules see pieces of it (an AWS secret key with a `/` in it reads as several short tokens). National
    IDs go before cards and phones, whose layouts some of them share; names and addresses go last, on text
    whose numbers, e-mails and keys are already placeholders."""
    from .pii_addresses import address_detectors
    from .pii_ids import NATIONAL_ID_DETECTORS
    from .pii_names import person_detectors
    from .pii_secrets import SECRET_DETECTORS

    # a type that is off is not built: the name lists and libphonenumber load only when asked for
    ordered = ((SECRET_DETECTORS if "SECRET" in types else ()) + BUILTIN_DETECTORS[:2]
               + (NATIONAL_ID_DETECTORS if "NATIONAL_ID" in types else ()) + BUILTIN_DETECTORS[2:]
               + ((phone_detector(phone_regions),) if phone_regions and "PHONE" in types else ())
               + (address_detectors() if "ADDRESS" in types else ())
               + (person_detectors(ner) if "PERSON" in types else ()))
    return tuple(d for d in ordered if d.type in types)


# a stretch of digits and the separators phones are written with, holding at least seven digits: what the
# matcher below is run on (it is slow per character of text, fast on a short string)
_PHONE_STRETCH = re.compile(r"(?<![\w+])\+?\(?\d[\d \t().-]{5,22}\d(?![\w])")


def phone_detector(regions: tuple[str, ...]) -> Detector:
    """Phones in national layouts (`020 7946 0958`, `01 42 68 53 00`) found and validated by Google's
    libphonenumber metadata, for each region in turn; a leading + works from any region. Runs after the regex
    above, which takes the common international and North American layouts first (and faster)."""
    import phonenumbers

    leniency = phonenumbers.Leniency.VALID  # a number the region's numbering plan can issue, not any digits

    def find(text: str, facts: TextFacts) -> Iterable[tuple[int, int]]:
        for stretch in _PHONE_STRETCH.finditer(text):
            if sum(c.isdigit() for c in stretch.group()) < 7:
                continue
            for region in regions:
                for m in phonenumbers.PhoneNumberMatcher(stretch.group(), region, leniency=leniency):
                    # a bare run of digits (2147483647) is a number in prose or code far more often than a phone
                    if not m.raw_string.isdigit():
                        yield stretch.start() + m.start, stretch.start() + m.end

    return Detector("PHONE", None, None, lambda t, f: f.digits >= 7, find)  # the shortest national number has 7


@dataclass
class PiiScrubber:
    salt: bytes
    extra_patterns: dict[str, str] = field(default_factory=dict)
    allowlist: tuple[str, ...] = ()
    counts: Counter = field(default_factory=Counter)
    types: frozenset[str] = frozenset(PII_TYPES)
    phone_regions: tuple[str, ...] = DEFAULT_PHONE_REGIONS
    # spans of names a recipe's own NER model finds (cleaning.pii_ner_model), on top of the rules
    ner: Callable[[str], Iterable[tuple[int, int]]] | None = None

    def __post_init__(self) -> None:
        unknown = set(self.types) - set(PII_TYPES)
        if unknown:
            raise ValueError(f"unknown PII type(s) {sorted(unknown)}; known: {', '.join(PII_TYPES)}")
        extra = tuple(Detector(name, re.compile(p)) for name, p in sorted(self.extra_patterns.items()))
        # user patterns first: they are the most specific knowledge of the domain
        self.detectors = extra + builtin_detectors(frozenset(self.types), tuple(self.phone_regions), self.ner)
        self._allow = frozenset(self.allowlist)

    @classmethod
    def for_rules(cls, salt: bytes, cfg, ner: Callable[[str], Iterable[tuple[int, int]]] | None = None
                  ) -> "PiiScrubber":
        """The scrubber a `cleaning:` section asks for (recipes.sections.cleaning.CleaningSection); `ner` reuses
        a model another scrubber already loaded."""
        if ner is None and cfg.pii_ner_model is not None and "PERSON" in cfg.pii_types:
            from .pii_names import load_ner

            ner = load_ner(cfg.pii_ner_model)
        return cls(salt, dict(cfg.extra_pii_patterns), tuple(cfg.pii_allowlist), types=frozenset(cfg.pii_types),
                   phone_regions=tuple(cfg.pii_phone_regions), ner=ner)

    def placeholder(self, type_: str, value: str) -> str:
        digest = hmac.new(self.salt, f"{type_}\x00{value}".encode(), hashlib.sha256).hexdigest()
        return f"<{type_}_{digest[:PLACEHOLDER_HEX]}>"

    def scrub(self, text: str) -> str:
        """text with every PII value replaced; counts what it replaced by type."""
        if not text:
            return text
        facts = TextFacts.of(text)  # of the original text: replacing values only removes candidates
        for det in self.detectors:
            if det.may_match is not None and not det.may_match(text, facts):
                continue
            if det.find is not None:
                text = self._replace_spans(det, text, facts)
            else:
                text = det.pattern.sub(lambda m, det=det: self._replace(det, m), text)
        return text

    def _replace(self, det: Detector, m: re.Match) -> str:
        if det.confirm_match is not None and not det.confirm_match(m):
            return m.group(0)
        if "v" not in m.re.groupindex or m.group("v") is None:
            return self._value(det, m.group(0))
        start, end = m.span("v")
        whole = m.group(0)
        s0 = m.start()
        return whole[:start - s0] + self._value(det, m.group("v")) + whole[end - s0:]

    def _value(self, det: Detector, value: str) -> str:
        if value in self._allow or PLACEHOLDER_RE.fullmatch(value):
            return value
        if det.confirm is not None and not det.confirm(value):
            return value
        self.counts[det.type] += 1
        return self.placeholder(det.type, value)

    def _replace_spans(self, det: Detector, text: str, facts: TextFacts) -> str:
        taken = [m.span() for m in PLACEHOLDER_RE.finditer(text)]  # earlier detectors' work stays as it is
        out, pos = [], 0
        for start, end in sorted(set(det.find(text, facts))):
            if start < pos or any(a < end and start < b for a, b in taken):
                continue
            out += [text[pos:start], self._value(det, text[start:end])]
            pos = end
        return "".join(out) + text[pos:] if out else text
