"""HTTP/1.1 pieces the proxy needs that involve no I/O: hop-by-hop rules, which methods may be
retried, and the bytes of the proxy's own responses (never a traceback, always a short plain
body). Parsing itself is llhttp's (httptools), which rejects ambiguous framing."""

from __future__ import annotations

from http import HTTPStatus

# RFC 9110 7.6.1: connection-specific fields a proxy must not forward.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)
# Fields the proxy sets itself on the way to the backend.
SET_BY_PROXY = frozenset({b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host"})
# RFC 9110 9.2.2: a failed attempt of these may be repeated.
IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
NO_BODY_STATUS = frozenset({204, 304})


def connection_tokens(value: bytes) -> list[bytes]:
    """The field names listed in a Connection header, lower case."""
    return [t.strip().lower() for t in value.split(b",") if t.strip()]


def reason(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode()
    except ValueError:
        return b"Unknown"


def error_response(
    status: int,
    message: str,
    *,
    close: bool = True,
    head_only: bool = False,
    extra: tuple[tuple[bytes, bytes], ...] = (),
) -> bytes:
    """A complete response of the proxy's own, with a one-line plain text body."""
    body = (message.rstrip("\n") + "\n").encode("utf-8", "replace")
    lines = [
        b"HTTP/1.1 %d %s" % (status, reason(status)),
        b"Content-Type: text/plain; charset=utf-8",
        b"Content-Length: %d" % len(body),
        b"Cache-Control: no-store",
    ]
    lines.extend(name + b": " + value for name, value in extra)
    if close:
        lines.append(b"Connection: close")
    head = b"\r\n".join(lines) + b"\r\n\r\n"
    return head if head_only else head + body


def printable(raw: bytes, limit: int = 200) -> str:
    """Peer-supplied bytes made safe for a response body or a log line."""
    text = raw[:limit].decode("latin-1")
    return "".join(ch if " " <= ch <= "~" else "?" for ch in text)


def split_absolute(url: bytes) -> tuple[bytes, bytes] | None:
    """An absolute-form request target (``http://host:port/path?q``) as (authority, origin-form
    target); None for any other form. RFC 9112 3.2.2: a proxy routes such a request by the
    URI's authority and ignores the Host field."""
    lower = url[:8].lower()
    if lower.startswith(b"http://"):
        rest = url[7:]
    elif lower.startswith(b"https://"):
        rest = url[8:]
    else:
        return None
    end = len(rest)
    for stop in (b"/", b"?", b"#"):
        at = rest.find(stop)
        if at != -1 and at < end:
            end = at
    authority, target = rest[:end], rest[end:]
    if target.startswith(b"?"):
        target = b"/" + target
    return authority, target or b"/"


def build_request_head(
    method: str,
    url: bytes,
    headers: list[tuple[bytes, bytes]],
    conn_tokens: list[bytes] | None,
    chunked: bool,
    upgrade: bytes | None,
    xff: bytes,
    host: bytes,
) -> bytes:
    """The request head sent to a backend: HTTP/1.1, the client's end-to-end fields minus those
    its Connection field names, our own framing and X-Forwarded-* fields."""
    if conn_tokens:
        drop = set(conn_tokens) - {b"host", b"content-length"}
        headers = [(n, v) for n, v in headers if n.lower() not in drop]
    parts = [method.encode(), b" ", url, b" HTTP/1.1\r\n"]
    for name, value in headers:
        parts += (name, b": ", value, b"\r\n")
    if chunked:
        parts.append(b"Transfer-Encoding: chunked\r\n")
    if upgrade is not None:
        parts += (b"Upgrade: ", upgrade, b"\r\nConnection: upgrade\r\n")
    parts += (
        b"X-Forwarded-For: ",
        xff,
        b"\r\nX-Forwarded-Proto: http\r\nX-Forwarded-Host: ",
        host,
        b"\r\n\r\n",
    )
    return b"".join(parts)
