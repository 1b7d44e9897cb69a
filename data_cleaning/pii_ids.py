"""NATIONAL_ID: social security, tax and citizen numbers, found by their national layout and confirmed by
python-stdnum's validators (check digits, and for SSNs the number ranges never issued).

A layout distinctive enough on its own (`536-22-1587`, `390.533.447-05`, `RCCMNL83S18D969H`) is taken
wherever it appears. A bare run of digits (`111222333`, `36574261809`) is only taken after a word that names
the number (`BSN`, `Steuer-ID`, `PESEL`, `SSN`), and checked against that country's rules alone: nine digits
are a valid US SSN far too often to be scrubbed as one on sight. An invalid check digit leaves the number as
it is, since it is then not the ID it looks like.
"""
from __future__ import annotations

import re
from typing import Callable

from .pii import Detector

_SEPARATORS = str.maketrans("", "", " -.+")


def _stdnum(*names: str) -> tuple[Callable[[str], bool], ...]:
    import importlib

    return tuple(importlib.import_module(f"stdnum.{name}").is_valid for name in names)


def _uk_nino_ok(value: str) -> bool:
    # HMRC's rules (no check digit): neither letter D, F, I, Q, U or V, O not second, and prefixes never issued
    v = value.replace(" ", "")
    return v[:2] not in {"BG", "GB", "NK", "KN", "TN", "NT", "ZZ"} and v[1] != "O"


# Layouts that identify on sight: group name -> (pattern, validators). A group matches the whole value.
_LAYOUTS: dict[str, tuple[str, tuple[str, ...]]] = {
    "us_ssn": (r"\d{3}-\d{2}-\d{4}|\d{3} \d{2} \d{4}", ("us.ssn",)),
    "ca_sin": (r"\d{3}-\d{3}-\d{3}|\d{3} \d{3} \d{3}", ("ca.sin",)),
    "br_cpf": (r"\d{3}\.\d{3}\.\d{3}-\d{2}", ("br.cpf",)),
    "fr_nir": (r"[12] ?\d{2} ?\d{2} ?(?:\d{2}|2[AB]) ?\d{3} ?\d{3} ?\d{2}", ("fr.nir",)),
    "it_cf": (r"[A-Z]{6}\d{2}[A-EHLMPR-T]\d{2}[A-Z]\d{3}[A-Z]", ("it.codicefiscale",)),
    "es_dni": (r"\d{8}-?[A-Z]", ("es.dni",)),
    "es_nie": (r"[XYZ]-?\d{7}-?[A-Z]", ("es.nie",)),
    "in_aadhaar": (r"[2-9]\d{3} \d{4} \d{4}", ("in_.aadhaar",)),
    "se_pnr": (r"(?:19|20)?\d{6}[-+]\d{4}", ("se.personnummer",)),
    "fi_hetu": (r"\d{6}[-+A-FU-Y]\d{3}[0-9A-Y]", ("fi.hetu",)),
    "kr_rrn": (r"\d{6}-\d{7}", ("kr.rrn",)),
    "cn_ric": (r"\d{17}[\dX]", ("cn.ric",)),
    "uk_nino": (r"[A-CEGHJ-PR-TW-Z][A-CEGHJ-NPR-TW-Z] ?\d{2} ?\d{2} ?\d{2} ?[A-D]", ()),
}
_ON_SIGHT = re.compile(
    r"(?<![\w.+-])(?:" + "|".join(f"(?P<{g}>{p})" for g, (p, _) in _LAYOUTS.items()) + r")(?![\w-]|\.\d)")

# Words that name a number, by country -> (cue pattern, validators of that country's numbers)
_CUES: dict[str, tuple[str, tuple[str, ...]]] = {
    "us": (r"ssn|social security(?: number| no\.?| #)?", ("us.ssn",)),
    "nl": (r"bsn|burgerservicenummer|sofinummer", ("nl.bsn",)),
    "ca": (r"sin|social insurance(?: number)?", ("ca.sin",)),
    "de": (r"steuer-?id|steuer-?identifikationsnummer|identifikationsnummer|idnr", ("de.idnr",)),
    "pl": (r"pesel", ("pl.pesel",)),
    "br": (r"cpf", ("br.cpf",)),
    "in": (r"aadhaa?r|uidai", ("in_.aadhaar",)),
    "dk": (r"cpr(?:-nummer| number)?", ("dk.cpr",)),
    "no": (r"f[øo]dselsnummer|personnummer", ("no.fodselsnummer", "se.personnummer")),
    "tr": (r"tc kimlik(?: no)?|kimlik no", ("tr.tckimlik",)),
    "gb": (r"nhs(?: number| no\.?)?", ("gb.nhs",)),
    # a number named only as an ID: any scheme with a check digit
    "any": (r"national id(?:entity)?(?: number| no\.?)?|id(?:entity)? (?:number|no\.?)|personal (?:id|number)",
            ("nl.bsn", "ca.sin", "de.idnr", "pl.pesel", "br.cpf", "in_.aadhaar", "no.fodselsnummer",
             "tr.tckimlik", "gb.nhs", "il.idnr", "za.idnr")),
}
_CUED = re.compile(
    r"(?i)(?<![\w-])(?:" + "|".join(f"(?P<{c}>{p})" for c, (p, _) in _CUES.items()) + r")(?![\w-])"
    r"[ \t]*(?:(?:is|number|no\.?|nr\.?|#|:|=|-)[ \t]*){0,3}"
    r"(?P<v>\d[\d \t.-]{6,17}\d)(?![\w-]|\.\d)")
_CUE_WORDS = ("ssn", "social", "bsn", "sofi", "sin", "steuer", "idnr", "identifikation", "pesel", "cpf", "aadha",
              "uidai", "cpr", "dselsnummer", "personnummer", "kimlik", "nhs", "id", "personal")


class _Validators:
    """Validators per layout or cue group, imported on first use (python-stdnum loads one module per country)."""

    def __init__(self, table: dict[str, tuple[str, tuple[str, ...]]]):
        self.table, self.loaded = table, {}

    def __call__(self, group: str) -> tuple[Callable[[str], bool], ...]:
        if group not in self.loaded:
            self.loaded[group] = _stdnum(*self.table[group][1])
        return self.loaded[group]


_LAYOUT_VALIDATORS = _Validators(_LAYOUTS)
_CUE_VALIDATORS = _Validators(_CUES)


def _on_sight_ok(m: re.Match) -> bool:
    group = m.lastgroup
    if group == "uk_nino":
        return _uk_nino_ok(m.group(0))
    raw = m.group(0)  # Finnish and Swedish numbers carry the century in their separator
    return any(ok(raw) or ok(raw.translate(_SEPARATORS)) for ok in _LAYOUT_VALIDATORS(group))


def _cued_ok(m: re.Match) -> bool:
    group = next(g for g in _CUES if m.group(g) is not None)
    value = m.group("v").translate(_SEPARATORS).replace("\t", "")
    return any(ok(value) for ok in _CUE_VALIDATORS(group))


NATIONAL_ID_DETECTORS = (
    Detector("NATIONAL_ID", _CUED, None, lambda t, f: f.digits >= 8 and any(w in f.lower for w in _CUE_WORDS),
             confirm_match=_cued_ok),
    # the shortest layout (a Spanish DNI, 8 digits and a letter; a UK NINO has 6) has six digits
    Detector("NATIONAL_ID", _ON_SIGHT, None, lambda t, f: f.digits >= 6, confirm_match=_on_sight_ok),
)
