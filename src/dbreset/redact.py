"""Text that is safe to show: passwords masked, control characters escaped.

A leaf module (standard library only), so that every layer, the settings
included, can mask what it prints without importing the connection code.
"""

from __future__ import annotations

import re
from urllib.parse import SplitResult, parse_qsl, unquote, urlencode, urlsplit, urlunsplit

#: ``password=value`` in a libpq key/value string: a value is quoted with ``'``
#: (and backslash escapes) or runs to the next space
_KEYVALUE_PASSWORD = re.compile(r"(\bpassword\s*=\s*)('(?:[^'\\]|\\.)*'?|[^\s']\S*)")
#: ``scheme://user:anything@rest``: everything from the first ':' after the user
#: name to the *last* '@' could be a password, in text that did not parse cleanly
_LOOSE_USERINFO = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*://[^:@/?#\s]*):(.*)@", re.S)
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def mask_url(url: str) -> str:
    """The URL with its password (in the user part or the query) replaced by ``***``.

    A URL whose user part is ambiguous (an unencoded ``/``, ``#``, ``?``, ``@``
    or space in the password) has everything between the user name and the
    last ``@`` masked: more than the password, never less. Text that is no URL,
    such as a libpq key/value string, has its ``password=...`` masked."""
    if "://" not in url:
        return _KEYVALUE_PASSWORD.sub(r"\1***", url)
    parts = _clean_split(url)
    if parts is None:
        loose = _LOOSE_USERINFO.match(url)
        if loose:
            url = f"{loose.group(1)}:***@{url[loose.end() :]}"
        return _KEYVALUE_PASSWORD.sub(r"\1***", url)
    netloc = parts.netloc
    userinfo, at, hostinfo = netloc.rpartition("@")
    if at and ":" in userinfo:
        netloc = f"{userinfo.partition(':')[0]}:***@{hostinfo}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        if any(key == "password" for key, _ in pairs):
            query = urlencode([(k, "***" if k == "password" else v) for k, v in pairs])
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def _clean_split(url: str) -> SplitResult | None:
    """*url* split, when its user part is unambiguous: at most one '@', and
    that one before the host, and no space in it; else None."""
    rest = url.partition("://")[2]
    try:
        parts = urlsplit(url)
    except ValueError:
        return None
    if rest.count("@") > 1 or ("@" in rest and "@" not in parts.netloc):
        return None
    if any(c.isspace() for c in parts.netloc):
        return None
    return parts


def password_of(url: str) -> str | None:
    """The password in *url* (or a libpq key/value string), as written."""
    if "://" not in url:
        found = _KEYVALUE_PASSWORD.search(url)
        if not found:
            return None
        value = found.group(2)
        if value.startswith("'"):
            value = re.sub(r"\\(.)", r"\1", value[1:].removesuffix("'"))
        return value or None
    loose = _LOOSE_USERINFO.match(url)
    if loose and url.partition("://")[2].count("@") > 1:
        return loose.group(2) or None
    try:
        parts = urlsplit(url)
        if parts.password:
            return parts.password
        for key, value in parse_qsl(parts.query):
            if key == "password":
                return value
    except ValueError:
        return loose.group(2) if loose else None
    return None


#: What ends a piece of a password that a URL parser split apart
_URL_DELIMITERS = re.compile(r"[/#?:@\s]+")


def _secrets(url: str) -> set[str]:
    """Every text that could be (part of) the password of *url*. When the URL
    does not parse cleanly, a parser's message may quote any piece of what lies
    between the user name and the last '@' ("invalid port 'Hunter'"): the whole
    of it and each piece between the characters that split it."""
    found: set[str] = set()
    secret = password_of(url)
    if secret:
        found |= {secret, unquote(secret)}
    if "://" not in url or _clean_split(url) is not None:
        return found  # the password is exactly known
    loose = _LOOSE_USERINFO.match(url)
    if loose and loose.group(2):
        span = loose.group(2)
        found |= {span, unquote(span)}
        found |= {piece for piece in _URL_DELIMITERS.split(span) if piece}
    return found


def scrub(text: str, url: str | None) -> str:
    """Remove the password of *url* from *text* (a driver message can hold the
    DSN, a parser's message a piece of an ambiguous URL's password)."""
    secrets = _secrets(url) if url else set()
    for form in sorted(secrets, key=len, reverse=True):
        if form:
            text = text.replace(form, "***")
    return text


def printable(text: str) -> str:
    """*text* with control characters (newlines, ANSI escapes, ...) written as
    ``\\n``, ``\\x1b``: names come from the database and reach a terminal."""
    if text.isprintable() or not _CONTROL.search(text):
        return text
    named = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
    return _CONTROL.sub(lambda m: named.get(m.group(), f"\\x{ord(m.group()):02x}"), text)


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
