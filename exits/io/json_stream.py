"""Streaming read of a large COCO-style json: its top-level keys one by one, one array item by item.

A COCO train json (860k annotations with polygons) takes several GB as Python objects; the
merge of pseudo labels and ``exits export`` only ever need one annotation at a time. The
reader here parses the top-level object with :meth:`json.JSONDecoder.raw_decode` over a
sliding text buffer: every top-level value is decoded whole, except the one streamed array
(``annotations``), whose items are decoded and yielded one at a time. Values come out
exactly as :func:`json.load` would give them (same decoder), so a writer that re-encodes
them with :func:`json.dumps` reproduces ``json.dump``'s bytes.

:func:`open_json_text` is the one way the project opens a json *file* it was given (the
annotations, a ``--gt`` file): gzip is read transparently (detected by its magic bytes, not
the suffix), UTF-8 with or without BOM, UTF-16 and UTF-32 are decoded (detected as
:func:`json.loads` does on bytes, RFC 8259 / 4627), and every failure (a directory, no
permission, not UTF-8, corrupt gzip) is a one-line :class:`JsonFileError` naming the file.

    with open_json_text(path) as fh:     # or open(path, encoding="utf-8")
        for key, value in iter_top_level(fh, stream="annotations", source=path):
            if key == "annotations":
                for ann in value:        # must be consumed before the next key is read
                    ...
"""
from __future__ import annotations

import codecs
import errno as _errno
import gzip
import io
import json
import os
import zlib
from typing import IO, Any, BinaryIO, Iterator

__all__ = ["iter_top_level", "JsonStreamError", "JsonFileError", "open_json_text", "dumps_like_dump"]

_WS = " \t\n\r"
_CHUNK = 1 << 22  # characters per read


class JsonStreamError(ValueError):
    """The file is not a json object of the expected shape (names the file and the offset).

    ``detail``: the message without the file name; ``top_level``: True when the text is
    valid so far but its top level is not an object; ``invalid``: False when the text is
    valid json that cannot be decoded here (nested too deeply, a number too long)."""

    def __init__(self, message: str, detail: str = "", top_level: bool = False, invalid: bool = True):
        super().__init__(message)
        self.detail = detail or message
        self.top_level = top_level
        self.invalid = invalid


class JsonFileError(ValueError):
    """A json file that cannot be read as text: a directory, no permission, a read error, not
    valid UTF-8/16/32, corrupt or truncated gzip, another archive format. One line that names
    the file and says what to do."""


# ------------------------------------------------------------------------- opening a file

_ARCHIVES = (  # magic bytes of formats that are not read here -> what to tell the user
    (b"PK\x03\x04", "a zip archive: unzip it and pass the json inside"),
    (b"BZh", "bzip2-compressed: decompress it first (bunzip2), or recompress with gzip"),
    (b"\xfd7zXZ\x00", "xz-compressed: decompress it first (unxz), or recompress with gzip"),
    (b"\x28\xb5\x2f\xfd", "zstd-compressed: decompress it first (unzstd), or recompress with gzip"),
)
_BOMS = (  # longest first: the UTF-32 LE BOM starts with the UTF-16 LE one
    (codecs.BOM_UTF32_LE, "utf-32-le"),
    (codecs.BOM_UTF32_BE, "utf-32-be"),
    (codecs.BOM_UTF8, "utf-8"),
    (codecs.BOM_UTF16_LE, "utf-16-le"),
    (codecs.BOM_UTF16_BE, "utf-16-be"),
)


def _detect_encoding(head: bytes) -> tuple[str, int]:
    """(codec, BOM length) of json bytes starting with ``head`` (4 bytes or fewer at the end of
    the file): a BOM, else the pattern of zero bytes in the first two ASCII characters (RFC
    4627; what :func:`json.detect_encoding` does), else UTF-8."""
    for bom, codec in _BOMS:
        if head.startswith(bom):
            return codec, len(bom)
    if len(head) >= 4:
        if not head[0]:
            return ("utf-16-be" if head[1] else "utf-32-be"), 0
        if not head[1]:
            return ("utf-16-le" if head[2] or head[3] else "utf-32-le"), 0
    elif len(head) == 2:
        if not head[0]:
            return "utf-16-be", 0
        if not head[1]:
            return "utf-16-le", 0
    return "utf-8", 0


def _os_reason(exc: OSError) -> str:
    """'Permission denied (EACCES)': the errno's meaning and its name."""
    if exc.errno is None:
        return str(exc)
    name = _errno.errorcode.get(exc.errno, str(exc.errno))
    return f"{os.strerror(exc.errno)} ({name})"


def _read_stream(stream: BinaryIO, size: int, name: str, compressed: bool) -> bytes:
    try:
        return stream.read(size)
    except (OSError, EOFError, zlib.error) as exc:
        if compressed:
            raise JsonFileError(f"{name}: the gzip data is corrupt or truncated ({exc}); "
                                "check the file (gzip -t)") from None
        raise JsonFileError(f"{name}: read error: {_os_reason(exc)}") from None


class JsonText(io.TextIOBase):
    """Decoded text of a json file (what :func:`open_json_text` returns). ``read(n)`` returns
    at most ``n`` characters and "" only at the end of the file; decoding errors, read errors
    and corrupt gzip data raise :class:`JsonFileError` naming the file and the byte offset."""

    def __init__(self, raw: BinaryIO, stream: BinaryIO, path: str, codec: str, bom: int, head: bytes,
                 compressed: bool):
        super().__init__()
        self._raw, self._stream = raw, stream
        self.name = path
        self.codec, self.compressed = codec, compressed
        self._decoder = codecs.getincrementaldecoder(codec)("strict")
        self._pending = head  # bytes read for the detection, after the BOM
        self._consumed = bom  # bytes (of the decompressed data) passed to the decoder so far
        self._at_eof = False

    def readable(self) -> bool:
        return True

    def _read_bytes(self, size: int) -> bytes:
        data = _read_stream(self._stream, size, self.name, self.compressed)
        if self._pending:
            data, self._pending = self._pending + data, b""
        return data

    def _decode_error(self, exc: UnicodeDecodeError, start: int) -> JsonFileError:
        offset = start + exc.start
        bad = exc.object[exc.start:exc.start + 1]
        what = f"byte 0x{bad.hex()}" if bad else "the end of the file"
        where = f"at byte offset {offset}" + (" of the decompressed data" if self.compressed else "")
        if self.codec == "utf-8":
            return JsonFileError(
                f"{self.name}: not UTF-8 text: {what} {where} is not valid UTF-8 ({exc.reason}); "
                "json files must be UTF-8 (or UTF-16/32 with a BOM). If it is Latin-1 / Windows-1252, convert "
                f"it: iconv -f LATIN1 -t UTF-8 '{self.name}' > fixed.json")
        return JsonFileError(f"{self.name}: not valid {self.codec.upper()} text {where} ({exc.reason})")

    def read(self, size: int | None = -1) -> str:
        if size is None or size < 0:
            parts = []
            while True:
                chunk = self.read(1 << 22)
                if not chunk:
                    return "".join(parts)
                parts.append(chunk)
        if size == 0:
            return ""
        while not self._at_eof:
            data = self._read_bytes(max(int(size), 4))
            final = not data
            start = self._consumed - len(self._decoder.getstate()[0])
            try:
                text = self._decoder.decode(data, final)
            except UnicodeDecodeError as exc:
                raise self._decode_error(exc, start) from None
            self._consumed += len(data)
            self._at_eof = final
            if text:
                return text
        return ""

    def close(self) -> None:
        if not self.closed:
            try:
                if self._stream is not self._raw:
                    self._stream.close()
            finally:
                self._raw.close()
        super().close()


def open_json_text(path: str | os.PathLike) -> JsonText:
    """Open a json file for reading as text, whatever its compression and Unicode encoding.

    gzip (magic bytes ``1f 8b``, whatever the suffix) is decompressed on the fly; the text is
    UTF-8 (a UTF-8 BOM is skipped), or UTF-16 / UTF-32 (with a BOM, or detected from the zero
    bytes as RFC 4627 and :func:`json.loads` on bytes do). Use it as ``with open_json_text(p)
    as fh: json.load(fh)`` or with :func:`iter_top_level`.

    Raises:
        FileNotFoundError: there is no such file (callers word it for their file's role).
        JsonFileError: ``path`` is a directory, cannot be opened or read (the errno's meaning),
            is another archive format, or (while reading) is not valid text in its encoding
            or has corrupt gzip data. The message is one line naming the file.
    """
    name = os.fspath(path)
    try:
        raw = open(name, "rb")
    except FileNotFoundError:
        raise
    except IsADirectoryError:
        raise JsonFileError(f"{name} is a directory, not a json file") from None
    except OSError as exc:
        raise JsonFileError(f"{name}: cannot open the file: {_os_reason(exc)}") from None
    except ValueError as exc:  # an embedded NUL in the name
        raise JsonFileError(f"{name!r}: not a usable file name ({exc})") from None
    try:
        stream: BinaryIO = raw
        compressed = False
        try:
            magic = raw.peek(6)[:6]  # peek, not seek: a pipe works too
        except OSError as exc:
            raise JsonFileError(f"{name}: read error: {_os_reason(exc)}") from None
        if magic.startswith(b"\x1f\x8b"):
            stream = gzip.GzipFile(fileobj=raw, mode="rb")
            compressed = True
        else:
            for prefix, what in _ARCHIVES:
                if magic.startswith(prefix):
                    raise JsonFileError(f"{name}: the file is {what}")
        head = _read_stream(stream, 4, name, compressed)
        codec, bom = _detect_encoding(head)
        return JsonText(raw, stream, name, codec, bom, head[bom:], compressed)
    except BaseException:
        raw.close()
        raise


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

    def error(self, message: str, top_level: bool = False, invalid: bool = True) -> JsonStreamError:
        detail = f"{message} at character {self.offset + self.pos}"
        return JsonStreamError(f"{self.source}: {detail}", detail, top_level, invalid)

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
            except RecursionError:
                raise self.error("a value is nested too deeply to decode (more than about "
                                 f"{_nesting_limit()} levels of lists/objects)", invalid=False) from None
            except ValueError as exc:  # e.g. an integer of more than 4300 digits (sys.int_info)
                raise self.error(f"a value cannot be decoded ({exc})", invalid=False) from None
            # A number (or literal) that ends exactly at the buffer's end may continue in the
            # next chunk: read on and decode again.
            if end == len(self.buf) and not self.eof and self._more():
                continue
            self.pos = end
            return obj


def _nesting_limit() -> int:
    import sys

    return sys.getrecursionlimit()


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
    if not buf.peek():
        raise buf.error("the file is empty (or only white space): expected a json object", invalid=False)
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
