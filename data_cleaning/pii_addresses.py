"""ADDRESS: street addresses, by the street layouts of several countries and the words that introduce one.

- after a cue ("I live at", "my address is", "ship it to", "Address:", "Adresse:", "indirizzo:"), the rest of
  the clause, when it holds a house number;
- without one: a house number and a named street of a known type, in the order each language writes it
  (`742 Evergreen Terrace`, `12 rue de la Paix`, `Via Roma 10`, `Hauptstraße 5`, `Keizersgracht 123`), with
  the unit, city, state and postal code that follow it (`, Springfield, IL 62704`); and PO boxes.

pyap (the address finder on PyPI, US/Canada/UK only, last released 2020) caught 10 of the labelled set's 26
street lines; usaddress parses an address it is given but does not find one in text.
"""
from __future__ import annotations

import re

from .pii import Detector
from .pii_names import _UPPER

_W = rf"[{_UPPER}][\w'’.-]*"  # a capitalised word of a street or city name (Queen's, Champs-Élysées, St.)
_NUM = r"\d{1,5}[A-Za-z]?"
_EN_TYPES = (r"Street|St|Avenue|Ave|Road|Rd|Lane|Ln|Drive|Dr|Boulevard|Blvd|Way|Court|Ct|Place|Pl|Terrace|Ter|"
             r"Square|Sq|Crescent|Cres|Close|Highway|Hwy|Parkway|Pkwy|Circle|Cir|Row|Mews|Gardens|Grove|Walk|"
             r"Alley|Trail|Plaza")
_FR_TYPES = r"rue|avenue|av\.|boulevard|bd|place|chemin|allée|impasse|quai|route|cours"
_ROMANCE_TYPES = (r"Via|Viale|Piazza|Piazzale|Corso|Largo|Vicolo|Calle|C/|Avenida|Avda\.?|Av\.|Plaza|Paseo|Carrer|"
                  r"Carretera|Rua|Travessa|Praça|Alameda|Estrada|Rue|Strada|Bulevardul|ul\.|al\.|pl\.")
_ROMANCE_PARTICLES = r"(?:de|del|della|dei|degli|di|da|do|dos|das|la|las|los|el|des|du|le|l'|d')"
_COMPOUND = (r"straße|strasse|str\.|weg|allee|platz|gasse|damm|ufer|chaussee|straat|gracht|laan|plein|kade|"
             r"singel|dijk|gatan|gata|vägen|väg|vej|gade|veien")
_DIRECTION = r"(?:N|S|E|W|NE|NW|SE|SW|North|South|East|West)\.?"

_STREET = (
    rf"{_NUM}[ \t]+(?:{_DIRECTION}[ \t]+)?(?:{_W}[ \t]+){{1,4}}(?:{_EN_TYPES})\.?(?:[ \t]+{_DIRECTION})?"
    rf"|{_NUM}(?:[ \t]?(?:bis|ter))?,?[ \t]+(?:{_FR_TYPES})[ \t]+(?:{_ROMANCE_PARTICLES}[ \t]*){{0,2}}{_W}"
    rf"(?:[ \t-]+(?:{_ROMANCE_PARTICLES}[ \t]*){{0,2}}{_W}){{0,3}}"
    rf"|(?:{_ROMANCE_TYPES})[ \t]+(?:{_ROMANCE_PARTICLES}[ \t]+){{0,2}}{_W}"
    rf"(?:[ \t]+(?:{_ROMANCE_PARTICLES}[ \t]+){{0,2}}{_W}){{0,4}},?[ \t]+{_NUM}"
    r"|P\.?[ \t]?O\.?[ \t]?Box[ \t]+\d{1,6}|Postfach[ \t]+\d[\d ]{1,8}\d"
)
# one word ending in a street type, then the number (Hauptstraße 5, Keizersgracht 123, Drottninggatan 53):
# its own pattern, scanned only when one of the endings is in the text
_COMPOUND_STREET = rf"[{_UPPER}][\w'’-]*?(?:{_COMPOUND})[ \t]*{_NUM}(?:[-/]\d{{1,4}})?"
_COMPOUND_HINTS = tuple(e.replace("\\", "") for e in _COMPOUND.split("|"))
# what may follow a street line: a unit, a city, a state or province, a postal code
_TAIL_PART = (
    r"(?:Apt\.?|Apartment|Suite|Ste\.?|Unit|Flat|Floor|#)[ \t]*[\w-]+"
    r"|[A-Z]{2,3}[ \t]+(?:\d{5}(?:-\d{4})?|\d{4}|[A-Z]\d[A-Z][ \t]?\d[A-Z]\d)"
    rf"|\d{{2,5}}(?:[ -]\d{{2,3}})?(?:[ \t]+[A-Z]{{2}})?[ \t]+{_W}(?:[ \t-]+{_W})?"
    rf"|{_W}(?:[ \t]+{_W})?[ \t]+[A-Z]{{1,2}}\d[A-Z\d]?[ \t]?\d[A-Z]{{2}}"
    rf"|-[ \t]*[A-Z]{{2}}|\d{{5}}-\d{{3}}"
)
_TAIL = rf"(?:,?[ \t]+(?:{_TAIL_PART})|,[ \t]*{_W}(?:[ \t]+{_W}){{0,2}}){{0,4}}"
_FLAT_FIRST = r"(?:(?:Flat|Apt\.?|Apartment|Unit|Suite)[ \t]*[\w-]+,[ \t]*)?"
_STREET_ADDRESS = re.compile(rf"(?<![\w.-])(?P<v>{_FLAT_FIRST}(?:{_STREET}){_TAIL})(?![\w-])")
_COMPOUND_ADDRESS = re.compile(rf"(?<![\w.-])(?P<v>{_FLAT_FIRST}{_COMPOUND_STREET}{_TAIL})(?![\w-])")

_CUES = (r"i live at|i live in|i'm at|my (?:home |new |postal |mailing |billing |shipping )?address is|"
         r"(?:the )?(?:new )?(?:home |postal |mailing |billing |shipping |delivery )?address is|"
         r"(?:home |postal |mailing |billing |shipping |delivery )?address:|ship(?:ped)? (?:it |this |them |the \w+ )?to:?|"
         r"send (?:it|this|them|the \w+) to|deliver(?:ed)? (?:it |this |them )?to|mail (?:it|this) to|"
         r"adresse:|anschrift:|wohnhaft in|ich wohne in|j'habite (?:au|à)|dirección:|vivo en|indirizzo:|abito in|"
         r"endereço:|moro n[ao]|adres:|mieszkam (?:przy|na)|адрес:|adress:")
# the clause ends at a line end, a sentence end (not the period of St. or Blvd.), or a word that starts a
# new clause
_CLAUSE_END = (r"(?=\r?\n|$|(?<!St)(?<!Str)(?<!str)(?<!Blvd)(?<!Ave)(?<!Rd)(?<!Dr)(?<!Apt)(?<!\bO)(?<!\bP)"
               r"(?<!No)(?<!Nr)(?<!ul)(?<!al)(?<!pl)(?<!Av)\.(?:[ \t]|$)|[ \t]+(?:and|since|before|after|please|"
               r"but|until|last|on|for|because|from now)\b|,[ \t]+(?:please|and|but|since|so)\b|[;!?])")
_CUED_ADDRESS = re.compile(rf"(?i:(?<![\w'])(?:{_CUES}))[ \t]*(?P<v>[^\n]{{4,160}}?){_CLAUSE_END}")
# pieces of which every cue holds one (in lower case)
_CUE_HINTS = ("live at", "live in", "i'm at", "address is", "address:", "ship", "send ", "deliver", "mail it",
              "mail this", "adresse:", "anschrift:", "wohn", "habite", "dirección:", "vivo en", "indirizzo:",
              "abito in", "endereço:", "moro n", "adres:", "mieszkam", "адрес:", "adress:")


def _cued_ok(value: str) -> bool:
    # a house number or postal code, and a capitalised word: "I live at home" and "ship it to me" are not addresses
    return any(c.isdigit() for c in value) and re.search(rf"[{_UPPER}]", value) is not None


def _street_ok(value: str) -> bool:
    # an all-capitals word is an acronym in prose ("Via HTTP 2"), not a street name
    words = re.findall(rf"[{_UPPER}][\w'’-]+", value.split(",")[0])
    return not any(w.isupper() and len(w) > 2 for w in words)


def address_detectors() -> tuple[Detector, ...]:
    return (
        Detector("ADDRESS", _CUED_ADDRESS, _cued_ok,
                 lambda t, f: f.digits > 0 and any(h in f.lower for h in _CUE_HINTS)),
        Detector("ADDRESS", _STREET_ADDRESS, _street_ok, lambda t, f: f.digits > 0),
        Detector("ADDRESS", _COMPOUND_ADDRESS, _street_ok,
                 lambda t, f: f.digits > 0 and any(e in f.lower for e in _COMPOUND_HINTS)),
    )
