"""Redaction, the one mechanism that keeps secrets out of logs, records, manifests and errors.

A key can hide in a URL's userinfo (``https://user:KEY@host``) or its query (``?api-key=KEY``);
:func:`redact_url` removes both from one URL, :func:`redact_text` from every URL inside a text
(a command line, an error message).
"""

from __future__ import annotations

import re
import urllib.parse

__all__ = ["redact_text", "redact_url"]

_URL = re.compile(r"(?i)\bhttps?://[^\s'\"<>]+")


def redact_url(url: str) -> str:
    """``url`` without the credentials of its userinfo and without its query, if any."""
    parts = urllib.parse.urlsplit(url)
    if parts.username is not None or parts.password is not None:
        parts = parts._replace(netloc=f"***@{parts.netloc.rpartition('@')[2]}")
    if parts.query:
        parts = parts._replace(query="***")
    return urllib.parse.urlunsplit(parts)


def redact_text(text: str) -> str:
    """``text`` with every http(s) URL in it redacted as :func:`redact_url` does."""
    return _URL.sub(lambda m: redact_url(m.group(0)), text)
