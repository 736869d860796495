"""Streaming read of a large COCO-style json: its top-level keys one by one, one array item by item.

A COCO train json (860k annotations with polygons) takes several GB as Python objects; the
merge of pseudo labels and ``exits export`` only ever need one annotation at a time. The
reader here parses the top-level object with :meth:`json.JSONDecoder.raw_decode` over a
sliding text buffer: every top-level value is decoded whole, except the one streamed array
(``annotations``), whose items are decoded and yielded one at a time. Values come out
exactly as :func:`json.load` would give them (same decoder), so a writer that re-encodes
them with :func:`json.dumps` reproduces ``json.dump``'s bytes.

    with open(path, encoding="utf-8") as fh:
        for key, value in iter_top_level(fh, stream="annotations", source=path):
            if key == "annotations":
                for ann in value:        # must be consumed before the next key is read
                    ...
"""
from __future__ import annotations

import json
from typing import IO, Any, Iterator

__all__ = ["iter_top_level", "JsonStreamError", "dumps_like_dump"]

_WS = " \t\n\r"
_CHUNK = 1 << 22  # characters per read


class JsonStreamError(ValueError):
    """The file is not a json object of the expected shape (names the file and the offset).

    ``detail``: the message without the file name; ``top_level``: True when the text is
    valid so far but its top level is not an object."""

    def __init__(self, message: str, detail: str = "", top_level: bool = False):
        super().__init__(message)
        self.detail = detail or message
        self.top_level = top_level


class _Buffer:
    def __init__(self, fh: IO[str], source: str):
        self.fh = fh
        self.source = source
        self.buf = ""
        self.pos = 0
        self.offset = 0  # characters consumed before buf[0]
        self.eof = False
        self.decoder = json.JSONDecoder()

    def _more(self) -> bool:
        """Append the next chunk (keeping unread text); False at end of file."""
        if self.eof:
            return False
        data = self.fh.read(_CHUNK)
        if not data:
            self.eof = True
            return False
        self.offset += self.pos
        self.buf = self.buf[self.pos:] + data
        self.pos = 0
        return True

    def error(self, message: str, top_level: bool = False) -> JsonStreamError:
        detail = f"{message} at character {self.offset + self.pos}"
        return JsonStreamError(f"{self.source}: {detail}", detail, top_level)

    def peek(self) -> str:
        """Next non-whitespace character ('' at end of file), not consumed."""
        while True:
            while self.pos < len(self.buf) and self.buf[self.pos] in _WS:
                self.pos += 1
            if self.pos < len(self.buf):
                return self.buf[self.pos]
            if not self._more():
                return ""

    def expect(self, chars: str) -> str:
        ch = self.peek()
        if not ch or ch not in chars:
            raise self.error(f"expected {' or '.join(repr(c) for c in chars)}, found {ch or 'end of file'!r}")
        self.pos += 1
        return ch

    def value(self) -> Any:
        """Decode the next json value (reading more text until it is complete)."""
        self.peek()
        while True:
            try:
                obj, end = self.decoder.raw_decode(self.buf, self.pos)
            except json.JSONDecodeError as exc:
                if self._more():
                    continue
                raise self.error(f"invalid JSON ({exc.msg})") from exc
            # A number (or literal) that ends exactly at the buffer's end may continue in the
            # next chunk: read on and decode again.
            if end == len(self.buf) and not self.eof and self._more():
                continue
            self.pos = end
            return obj


def _items(buf: _Buffer) -> Iterator[Any]:
    buf.expect("[")
    if buf.peek() == "]":
        buf.pos += 1
        return
    while True:
        yield buf.value()
        if buf.expect(",]") == "]":
            return


def iter_top_level(fh: IO[str], stream: str = "annotations", source: str = "<json>") -> Iterator[tuple[str, Any]]:
    """(key, value) for each top-level key of the json object in ``fh``, in file order.

    The value of key ``stream`` is an iterator over its array items (consume it before
    advancing); every other value is decoded whole.

    Raises:
        JsonStreamError: the text is not a json object, ``stream`` is not an array, or the
            json is malformed (message names ``source`` and the character offset).
    """
    buf = _Buffer(fh, source)
    if buf.peek() != "{":
        raise buf.error("expected '{' (the top level must be an object)", top_level=bool(buf.peek()) and buf.peek() in '["0123456789-tfn')
    buf.pos += 1
    if buf.peek() == "}":
        buf.pos += 1
        return
    while True:
        if buf.peek() != '"':
            raise buf.error("expected a key")
        key = buf.value()
        buf.expect(":")
        if key == stream:
            if buf.peek() != "[":
                raise buf.error(f"'{stream}' is not a list")
            items = _items(buf)
            yield key, items
            for _ in items:  # whatever the consumer left unread
                pass
        else:
            yield key, buf.value()
        if buf.expect(",}") == "}":
            if buf.peek():
                raise buf.error("extra data after the top-level object")
            return


def dumps_like_dump(value: Any) -> str:
    """``json.dumps(value)``: the same text ``json.dump(value, fh)`` (default settings) writes."""
    return json.dumps(value)
