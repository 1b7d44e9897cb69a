"""SECRET: values that a keyword says are secret (`password = ...`, `secret_key: ...`, `"api_token": "..."`, "my
password is ..."), the password in a URL (`postgres://user:PASS@host`), bearer tokens, and whole private-key
blocks (PEM and OpenSSH, over many lines).

Written here rather than taken from detect-secrets: its KeywordDetector, measured on the labelled set in
tests/_pii_cases.py, caught 16 of 24 secrets in its YAML mode while replacing `pwd=None` and `os.environ[...]`
in the stdlib docs, and 8 of 24 in its code mode; it reads one line at a time, so a private key's body (the
secret part) is never found, only its BEGIN line. The rules below keep the keyword and replace the value,
and leave code alone: a value that is an identifier, an attribute, a call, a subscript, a template (`${X}`,
`{{ x }}`, `<your token>`) or a literal (`None`, `True`) is what a program does with a secret, not one.
"""
from __future__ import annotations

import re

from .pii import _API_KEY_PREFIXED, _TOKEN_CANDIDATE, Detector, _high_entropy_token

# The name of a secret, at the end of an identifier (`aws_secret_access_key`, `DB_PASSWORD`, `api_token`) but
# not inside a longer word: `max_tokens`, `tokenizer`, `secrets.token_hex` and `password_hash` do not match.
_KEYWORD = (r"(?:passw(?:or)?d|passphrase|pwd|secret(?:[_.-]?(?:access[_.-]?)?key)?|api[_.-]?(?:key|secret|token)"
            r"|apikey|access[_.-]?(?:key|token)|private[_.-]?key|token)")
# `=`, `:`, `:=`, `=>`, a quote closing a JSON key first, or "is"/"was" in prose; never `==`
_ASSIGN = r"""["']?[ \t]*(?:[:=]>?|:=|[ \t]+(?:is|was)[ \t]+)(?!=)[ \t]*"""
_KEYWORD_QUOTED = re.compile(
    r"(?i)(?<![A-Za-z0-9])" + _KEYWORD + r"(?![A-Za-z0-9])" + _ASSIGN
    + r"""(?:[bru]?(?P<q>["'`]))(?P<v>[^"'`\n]{4,200})(?P=q)""")
_KEYWORD_BARE = re.compile(
    r"(?i)(?<![A-Za-z0-9])" + _KEYWORD + r"(?![A-Za-z0-9])" + _ASSIGN
    + r"""(?P<v>(?![=\s"'`])[^\s"'`,;)}\]]{4,200}?)(?=[.?!:]?(?:[\s"'`,;)}\]]|$))""")
_URL_PASSWORD = re.compile(r"(?i)\b[a-z][a-z0-9+.-]{1,20}://[^\s:/@]{1,64}:(?P<v>[^\s:/@]{3,128})@")
_BEARER = re.compile(r"\b(?:Bearer|Basic|Token)[ \t]+(?P<v>[A-Za-z0-9._~+/-]{16,}=*)(?![\w.~+/-])")
_PRIVATE_KEY = re.compile(
    r"(?P<head>-----BEGIN (?P<kind>[A-Z0-9 ]*PRIVATE KEY(?: BLOCK)?)-----[ \t]*\r?\n)"
    r"(?P<v>[\s\S]+?)"
    r"(?=\r?\n-----END (?P=kind)-----|\r?\n[ \t]*\r?\n|\Z)")

# an expression a program computes the secret with: `password`, `os.environ['X'`, `getpass.getpass()`,
# `settings.API_KEY`, `tokens[0`
_CODE = re.compile(r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+|[A-Za-z_][\w.]*[\[(].*")
_IDENTIFIER = re.compile(r"[A-Za-z_]\w*")
_TEMPLATE = re.compile(r"\$\{|\$[A-Z_]{2}|\{\{|\{%|%\(|%s|^<.*>$|^\*+$|^[xX]+$|^\.\.\.")
_LITERALS = frozenset({"none", "null", "nil", "true", "false", "undefined", "required", "optional", "str",
                       "bytes", "string", "secret", "password", "token", "changeme", "redacted", "hidden"})


def _looks_like_secret(value: str, bare: bool) -> bool:
    v = value.strip()
    if len(v) < 4 or v.lower() in _LITERALS or _TEMPLATE.search(v) or len(set(v)) < 3:
        return False
    if _API_KEY_PREFIXED.fullmatch(v) or (_TOKEN_CANDIDATE.fullmatch(v) and _high_entropy_token(v)):
        return False  # an API key by its own form: the API_KEY rules after these take it, and count it as one
    if bare:
        # unquoted, a value must carry a letter and a digit: prose ("the password is required") and code
        # (`password = getpass()`, `pwd=None`) have words, not digits; a path is a working directory (`PWD=/home`)
        if _CODE.fullmatch(v) or v[0] in "/~." or not (any(c.isdigit() for c in v) and any(c.isalpha() for c in v)):
            return False
        if _IDENTIFIER.fullmatch(v):
            return _identifier_is_secret(v)
    return True


def _identifier_is_secret(v: str) -> bool:
    """`tok_4f9a8b7c6d`, `Blu3Horiz0n` are secrets; `password2`, `sha256`, `Python3`, `utf8` are names in code."""
    digits = sum(c.isdigit() for c in v)
    if digits >= 3 and not v.rstrip("0123456789").isalpha():
        return True
    inner_digit = any(c.isdigit() for c in v.rstrip("0123456789"))
    return inner_digit and any(c.isupper() for c in v) and any(c.islower() for c in v)


def _quoted_ok(m: re.Match) -> bool:
    # in backquotes a value is markdown code (`OrderedDict.values`), held to the rules of an unquoted one
    return _looks_like_secret(m.group("v"), bare=m.group("q") == "`")


def _bare_ok(value: str) -> bool:
    return _looks_like_secret(value, bare=True)


def _url_password_ok(value: str) -> bool:
    return value.lower() not in _LITERALS and not _TEMPLATE.search(value)


_HINTS = ("pass", "pwd", "secret", "token", "key")

SECRET_DETECTORS = (
    Detector("SECRET", _PRIVATE_KEY, None, lambda t, f: "PRIVATE KEY-----" in t),
    Detector("SECRET", _URL_PASSWORD, _url_password_ok, lambda t, f: "://" in t and "@" in t),
    Detector("SECRET", _BEARER, None, lambda t, f: "Bearer" in t or "Basic" in t or "Token " in t),
    Detector("SECRET", _KEYWORD_QUOTED, None, lambda t, f: any(h in f.lower for h in _HINTS),
             confirm_match=_quoted_ok),
    Detector("SECRET", _KEYWORD_BARE, _bare_ok, lambda t, f: any(h in f.lower for h in _HINTS)),
)
