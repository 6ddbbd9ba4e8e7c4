"""Reading a request body at socket speed, for the views that stream one
themselves (a resumable upload's part).

gunicorn hands a body through three buffers (its socket unreader, the length
reader, the `Body` object), each a BytesIO written, copied out and sliced per
piece: about six copies of every byte, most of the web process's 2.5-4 CPU
seconds per GB of upload. Under gunicorn, `body_reader` reads the client's
socket itself with `recv_into` into the caller's buffer, after taking what
gunicorn had read ahead, and keeps gunicorn's length reader told how much of
the body is left, so the connection's next request starts where it should.
Under any other server, or once something has read from the body, it reads
`wsgi.input` like everyone else.
"""

from __future__ import annotations

import io


class _StreamBody:
    """Any WSGI input: read, then copy into the caller's buffer."""

    def __init__(self, stream, length: int):
        self._stream = stream if stream is not None else io.BytesIO()
        self._left = length

    def readinto(self, view: memoryview) -> int:
        got = 0
        while got < len(view) and self._left:
            data = self._stream.read(min(len(view) - got, self._left))
            if not data:
                break
            view[got:got + len(data)] = data
            got += len(data)
            self._left -= len(data)
        return got


class _GunicornSocketBody:
    """The body straight from gunicorn's client socket (see the module's docstring)."""

    def __init__(self, body, sock):
        self._body, self._reader, self._sock = body, body.reader, sock
        held = self._reader.unreader.take_buffered()  # body bytes gunicorn read with the headers
        if len(held) > self._reader.length:  # never past the body: the rest is the next request's
            self._reader.unreader.unread(held[self._reader.length:])
            held = held[:self._reader.length]
        self._held = memoryview(held)

    def readinto(self, view: memoryview) -> int:
        """Fill view from the body; fewer bytes only at its end or when the client went away."""
        got = 0
        try:
            while got < len(view) and self._reader.length:
                want = min(len(view) - got, self._reader.length)
                if self._held:
                    n = min(want, len(self._held))
                    view[got:got + n] = self._held[:n]
                    self._held = self._held[n:]
                else:
                    n = self._sock.recv_into(view[got:got + want])
                    if n == 0:  # the client closed: gunicorn closes the connection after the answer
                        self._body.failed = True
                        break
                got += n
                self._reader.length -= n
        except OSError:
            self._body.failed = True  # where the next request starts is unknown: no keep-alive
            raise
        return got


def body_reader(meta: dict, stream, length: int):
    """An object whose `readinto(view)` fills view from the request body (of
    `length` bytes, as Content-Length says): from gunicorn's socket when the
    body is untouched, else from `stream` (DRF's `request.stream`)."""
    body, sock = meta.get("wsgi.input"), meta.get("gunicorn.socket")
    reader = getattr(body, "reader", None)
    untouched = (
        sock is not None
        and getattr(reader, "length", None) == length
        and hasattr(getattr(reader, "unreader", None), "take_buffered")
        and isinstance(getattr(body, "buf", None), io.BytesIO)
        and not body.buf.getvalue()
    )
    return _GunicornSocketBody(body, sock) if untouched else _StreamBody(stream, length)
