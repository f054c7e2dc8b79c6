"""Secrets out of text: the one function every URL and error text passes through before it is shown.

``NATS_URL``, ``VALKEY_URL`` and the model providers' URLs may carry
credentials, and exception texts quote those URLs; a provider's error may
echo ``ANTHROPIC_API_KEY``. Whatever becomes a log line, an exception message,
an HTTP response, a printed banner or a Workshop page goes through
:func:`redact` first. It hides:

* the password of a URL's userinfo: ``nats://user:pw@host`` → ``nats://user:***@host``;
* a lone token: ``nats://tok@host`` → ``nats://***@host``;
* every URL of a comma-separated server list, with or without the scheme
  repeated (``nats://a:pw@h1:4222,b:pw@h2:4222``), IPv6 hosts included;
* any scheme: ``nats``, ``tls``, ``ws``, ``valkey``, ``valkeys``, ``redis``,
  ``rediss``, ``http``, ``https``, ...;
* query-string and ``key=value`` secrets: ``?password=``, ``&token=``,
  ``auth_token=``, ``api_key=``, ``client_secret=`` ...;
* Anthropic API keys anywhere in the text: ``sk-ant-...`` → ``sk-ant-***``.

It works on text, not on parsed URLs, so it never raises: a malformed URL, a
list, or a sentence that quotes three URLs all come back with their secrets
replaced. When in doubt it hides too much (a host after an ``@`` in a path
loses what came before it) rather than too little.
"""

from __future__ import annotations

import re
from urllib.parse import unquote

__all__ = ["MASK", "redact"]

#: What a secret is replaced by.
MASK = "***"

_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://")
# Where the text of a URL ends: whitespace, quotes and angle brackets never occur in one.
_URL_END = re.compile(r"""[\s"'<>`]""")
# A username shown as it is; anything else in front of the password is hidden too.
_USER = re.compile(r"[A-Za-z0-9._~%!$&()*+;=\-]+")
# A list entry with no userinfo: a host (or [IPv6]), a port, maybe a path or query.
_HOSTLIKE = re.compile(r"(?:\[[0-9A-Za-z:.%]*\]|[A-Za-z0-9._\-]*)(?::\d*)?(?:[/?#].*)?", re.S)
# name=value where the name says the value is a secret (query strings, DSNs, log fields).
_KEY_VALUE = re.compile(
    r"(?i)(?<![A-Za-z0-9])"
    r"((?:[A-Za-z0-9]*[_\-])?(?:password|passwd|passphrase|pwd|pass|secret|token|auth|credentials?|signature|sig"
    r"|(?:api|access|secret|private)[_\-]?key|apikey))"
    r"=([^\s&#\"'<>]+)"
)
_ANTHROPIC_KEY = re.compile(r"sk-ant-[A-Za-z0-9_\-]+")
# Secrets shorter than this are not replaced where they occur outside a URL:
# "ab" would turn every word that contains it into ***.
_MIN_KNOWN = 4


def redact(text: str, *sources: str) -> str:
    """``text`` with every credential in it replaced by ``***``.

    Args:
        text: A URL, a comma-separated list of URLs, or free text (an exception
            message, a log line) that may quote URLs and keys.
        sources: URLs (or settings text) whose secrets must go even where ``text``
            quotes them outside a URL, decoded or not (an error message that
            names the password alone, say); pass the URL a message is about.

    Returns:
        The text with passwords, tokens, query-string secrets and API keys
        replaced; the usernames, hosts, ports and paths stay readable. Never raises.
    """
    if not text:
        return text
    shown = _scan(text, None)
    if sources:
        known: set[str] = set()
        for source in sources:
            if source:
                _scan(source, known)
        for secret in sorted(known, key=len, reverse=True):
            for form in {secret, unquote(secret)}:
                if len(form) >= _MIN_KNOWN and form != MASK:
                    shown = shown.replace(form, MASK)
    return shown


def _scan(text: str, found: set[str] | None) -> str:
    """Replace the secrets of ``text``; add each one replaced to ``found`` if given."""
    if "@" in text and "://" in text:
        text = _userinfos(text, found)
    if "=" in text:
        text = _KEY_VALUE.sub(lambda m: _keep(found, m.group(2), f"{m.group(1)}={MASK}"), text)
    if "sk-ant-" in text:
        text = _ANTHROPIC_KEY.sub(lambda m: _keep(found, m.group(0), f"sk-ant-{MASK}"), text)
    return text


def _keep(found: set[str] | None, secret: str, replacement: str) -> str:
    if found is not None and secret != MASK:
        found.add(secret)
    return replacement


def _userinfos(text: str, found: set[str] | None) -> str:
    out: list[str] = []
    pos = 0
    while True:
        m = _SCHEME.search(text, pos)
        if m is None:
            break
        start = m.end()
        end_m = _URL_END.search(text, start)
        end = end_m.start() if end_m else len(text)
        nxt = _SCHEME.search(text, start, end)  # the next URL of a list starts a new one
        if nxt is not None:
            end = nxt.start()
        out.append(text[pos:start])
        out.append(",".join(_hide(chunk, found) for chunk in _entries(text[start:end])))
        pos = end
    out.append(text[pos:])
    return "".join(out)


def _entries(segment: str) -> list[str]:
    """The entries of a comma-separated list after a scheme (a comma in a password stays in its entry)."""
    if "," not in segment:
        return [segment]
    pieces = segment.split(",")
    entries: list[str] = []
    pending: str | None = None
    for i, piece in enumerate(pieces):
        entry = piece if pending is None else f"{pending},{piece}"
        # "u:p" before ",w@h" is not a host: the password was "p,w".
        if "@" not in entry and not _HOSTLIKE.fullmatch(entry) and any("@" in p for p in pieces[i + 1 :]):
            pending = entry
            continue
        entries.append(entry)
        pending = None
    if pending is not None:
        entries.append(pending)
    return entries


def _hide(entry: str, found: set[str] | None) -> str:
    """One URL after its scheme: the userinfo before the last ``@`` hidden."""
    at = entry.rfind("@")
    if at <= 0:
        return entry
    userinfo = entry[:at]
    user, colon, password = userinfo.partition(":")
    if colon and (not user or _USER.fullmatch(user)):
        _keep(found, password, "")
        return f"{user}:{MASK}{entry[at:]}"
    _keep(found, userinfo, "")  # a token, or userinfo we cannot tell apart: all of it
    if colon:
        _keep(found, password, "")
    return f"{MASK}{entry[at:]}"
