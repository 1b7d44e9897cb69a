"""PII scrubbing: find e-mails, phones, IP addresses, card numbers, IBANs and API keys/tokens, and replace
each with a typed placeholder carrying a salted hash, `<EMAIL_3f2a>`.

Equal values get equal placeholders (so a conversation that mentions one address twice stays coherent and
duplicates stay duplicates), while the value itself cannot be read back without the salt. Candidates
found by a regex are confirmed by a checksum or parser where one exists (Luhn for cards, mod-97 for
IBANs, `ipaddress` for IPs), which keeps version numbers, dates and slices in code out of the net.
"""
from __future__ import annotations

import hashlib
import hmac
import ipaddress
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

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


@dataclass(frozen=True)
class TextFacts:
    """Cheap facts about a text that rule detectors out before their (slow) regex scans it."""

    longest_word: int
    has_at: bool
    has_3_digits: bool

    @classmethod
    def of(cls, text: str) -> "TextFacts":
        return cls(max(map(len, text.split()), default=0), "@" in text, _DIGITS3.search(text) is not None)


@dataclass(frozen=True)
class Detector:
    type: str
    pattern: re.Pattern
    confirm: Callable[[str], bool] | None = None
    # None = always scan; else scan only when this says a match is possible (never a false "no")
    may_match: Callable[[str, TextFacts], bool] | None = None


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


@dataclass
class PiiScrubber:
    salt: bytes
    extra_patterns: dict[str, str] = field(default_factory=dict)
    allowlist: tuple[str, ...] = ()
    counts: Counter = field(default_factory=Counter)

    def __post_init__(self) -> None:
        extra = tuple(Detector(name, re.compile(p)) for name, p in sorted(self.extra_patterns.items()))
        # user patterns first: they are the most specific knowledge of the domain
        self.detectors = extra + BUILTIN_DETECTORS
        self._allow = frozenset(self.allowlist)

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
            text = det.pattern.sub(lambda m, det=det: self._replace(det, m), text)
        return text

    def _replace(self, det: Detector, m: re.Match) -> str:
        value = m.group(0)
        if value in self._allow or PLACEHOLDER_RE.fullmatch(value):
            return value
        if det.confirm is not None and not det.confirm(value):
            return value
        self.counts[det.type] += 1
        return self.placeholder(det.type, value)
