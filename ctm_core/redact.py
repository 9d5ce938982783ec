"""Secrets out of URIs: what may be printed, stored or forwarded of a location.

A URI can carry credentials in its user-info (`https://user:token@host/...`, `postgresql://user:pw@db/...`) and in
its query (presigned S3/GCS URLs: `X-Amz-Signature=...`, `sig=...`). `redact_uri` keeps scheme, host, port and path
and drops the rest, so the result names the place but grants nothing. Plain paths pass through unchanged.
"""

from __future__ import annotations

import re
import urllib.parse

__all__ = ["is_loopback_url", "redact_text", "redact_uri"]

_MARK = "***"
_URI_RE = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>]+")


def redact_uri(value: str | None) -> str | None:
    """`value` without user-info, password, query string or fragment (each replaced by `***` when present)."""
    if value is None or "://" not in value:
        return value
    if "@" not in value.split("://", 1)[1].split("/", 1)[0] and "?" not in value and "#" not in value:
        return value  # nothing secret: keep it byte for byte (e.g. sqlite:////abs/path.db)
    try:
        parts = urllib.parse.urlsplit(value)
        host = parts.hostname or ""
        port = parts.port
    except ValueError:  # unparsable authority: keep only the scheme
        return value.split("://", 1)[0] + "://" + _MARK
    if ":" in host:  # IPv6 literal
        host = f"[{host}]"
    netloc = (f"{_MARK}@" if "@" in parts.netloc else "") + host + (f":{port}" if port is not None else "")
    query = _MARK if parts.query else ""
    fragment = _MARK if parts.fragment else ""
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, query, fragment))


def redact_text(text: str) -> str:
    """Every URI inside `text` redacted (for error messages that quote their inputs); trailing punctuation kept."""

    def one(match: re.Match[str]) -> str:
        uri = match.group(0)
        core = uri.rstrip(".,:;)]}")
        return (redact_uri(core) or "") + uri[len(core) :]

    return _URI_RE.sub(one, text)


def is_loopback_url(url: str) -> bool:
    """True when `url`'s host is `localhost` or a loopback address (127.0.0.0/8, ::1): nobody else is on the path,
    so a secret may travel there over plain http."""
    import ipaddress

    try:
        host = urllib.parse.urlsplit(url).hostname or ""
    except ValueError:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
