"""Read R's lazy-load databases (an ``.rdx`` index plus an ``.rdb`` store) without R.

R packages ship their data sets this way (``data/Rdata.rdx`` + ``data/Rdata.rdb``). Both files hold
values in R's XDR serialization format, which is simple enough to walk for the few types that data
sets of text need. Only the standard library is used, so reading a package's data costs nothing to
install.

Values come back as plain Python: atomic vectors as lists (``NA`` as ``None``), a generic list as a
``dict`` when it has names and a ``list`` otherwise, a symbol as its name. Other attributes are read
(the stream must be walked) but dropped.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import math
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import AdaPrunerError

# SEXP type codes (R's Rinternals.h) and the pseudo-types of the serialization format (serialize.c).
SYMSXP, LISTSXP, CHARSXP, LGLSXP, INTSXP, REALSXP, STRSXP, VECSXP = 1, 2, 9, 10, 13, 14, 16, 19
NILVALUE_SXP, REFSXP = 254, 255

# Bits of the flags word that starts every serialized item.
HAS_ATTRIBUTES = 1 << 9
HAS_TAG = 1 << 10
# Encoding bits of a CHARSXP's "levels" (flags >> 12).
LATIN1_MASK = 1 << 2

NA_INTEGER = -(2**31)  # R's NA for integers and logicals


class RDataError(AdaPrunerError):
    """An R data file that is damaged or uses a feature this reader does not cover."""


@dataclass
class _Unserializer:
    """A cursor over one XDR stream, with the table that back-references (REFSXP) point into."""

    data: bytes
    pos: int = 0
    refs: list[object] = field(default_factory=list)

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise RDataError("R serialization ends early (truncated data)")
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def integer(self) -> int:
        return struct.unpack(">i", self.take(4))[0]

    def length(self) -> int:
        n = self.integer()
        if n == -1:  # a long vector: the length follows as two 32-bit halves
            upper, lower = struct.unpack(">II", self.take(8))
            n = (upper << 32) + lower
        return n

    def header(self) -> None:
        fmt = self.take(2)
        if fmt != b"X\n":
            raise RDataError(f"unsupported R serialization format {fmt!r} (only XDR binary 'X' is read)")
        version = self.integer()
        self.take(8)  # the R version that wrote it and the oldest that can read it
        if version == 3:
            self.take(self.integer())  # native encoding name, e.g. "UTF-8"; strings carry their own flags
        elif version != 2:
            raise RDataError(f"unsupported R serialization version {version}")

    def item(self) -> object:
        flags = self.integer()
        kind = flags & 0xFF
        if kind == NILVALUE_SXP:
            return None
        if kind == REFSXP:
            index = flags >> 8 or self.integer()  # small indices are packed into the flags word
            if not 0 < index <= len(self.refs):
                raise RDataError(f"R serialization refers back to object {index}, which it never stored")
            return self.refs[index - 1]
        if kind == SYMSXP:
            name = self.item()  # the symbol's printname, a CHARSXP
            self.refs.append(name)
            return name
        if kind == LISTSXP:
            return self.pairlist(flags)
        if kind == CHARSXP:
            return self.string(flags)
        if kind in (LGLSXP, INTSXP, REALSXP, STRSXP, VECSXP):
            value = self.vector(kind)
            attributes = self.pairlist(self.integer()) if flags & HAS_ATTRIBUTES else {}
            names = attributes.get("names")
            if kind == VECSXP and isinstance(names, list) and len(names) == len(value):
                return dict(zip(names, value, strict=True))
            return value
        raise RDataError(f"unsupported R object type {kind} in serialized data")

    def pairlist(self, flags: int) -> dict[object, object]:
        """A pairlist as ``{tag: value}``, walked as a loop since long ones would overflow recursion."""
        out: dict[object, object] = {}
        while flags & 0xFF == LISTSXP:
            if flags & HAS_ATTRIBUTES:
                self.item()
            tag = self.item() if flags & HAS_TAG else len(out)
            out[tag] = self.item()
            flags = self.integer()
        if flags & 0xFF != NILVALUE_SXP:
            raise RDataError(f"unsupported pairlist ending with R object type {flags & 0xFF}")
        return out

    def string(self, flags: int) -> str | None:
        n = self.integer()
        if n == -1:
            return None
        raw = self.take(n)
        return raw.decode("latin-1" if (flags >> 12) & LATIN1_MASK else "utf-8", errors="replace")

    def vector(self, kind: int) -> list:
        n = self.length()
        if kind in (STRSXP, VECSXP):
            return [self.item() for _ in range(n)]
        if kind == REALSXP:
            return list(struct.unpack(f">{n}d", self.take(8 * n)))
        ints = struct.unpack(f">{n}i", self.take(4 * n))
        if kind == LGLSXP:
            return [None if v == NA_INTEGER else bool(v) for v in ints]
        return [None if v == NA_INTEGER else v for v in ints]


def unserialize(data: bytes) -> object:
    """The value in one complete XDR serialization (header included)."""
    reader = _Unserializer(data)
    reader.header()
    return reader.item()


def _decompress(blob: bytes, compression: int) -> bytes:
    """Undo R's lazy-load compression: a big-endian uncompressed length, then the compressed bytes.

    Type 1 (``compress = TRUE``) is a bare zlib stream. Types 2 and 3 put a method byte after the
    length, since R falls back to storing data raw ('0') when compression would not shrink it.
    """
    if compression == 0:
        return blob
    if len(blob) < 4:
        raise RDataError("lazy-load entry is too short to hold its length")
    size = struct.unpack(">I", blob[:4])[0]
    method, payload = (b"1", blob[4:]) if compression == 1 else (blob[4:5], blob[5:])
    try:
        if method == b"1":
            data = zlib.decompress(payload)
        elif method == b"2":
            data = bz2.decompress(payload)
        elif method == b"Z":
            # R writes a raw LZMA2 stream (no .xz container). A dictionary as large as the output suffices.
            filters = [{"id": lzma.FILTER_LZMA2, "dict_size": max(size, 4096)}]
            data = lzma.decompress(payload, format=lzma.FORMAT_RAW, filters=filters)
        elif method == b"0":
            data = payload
        else:
            raise RDataError(f"unknown lazy-load compression method {method!r}")
    except (zlib.error, OSError, lzma.LZMAError, ValueError) as exc:
        raise RDataError(f"lazy-load entry does not decompress: {exc}") from None
    if len(data) != size:
        raise RDataError(f"lazy-load entry decompressed to {len(data)} bytes, expected {size}")
    return data


def _compression(value: object) -> int:
    """The ``compressed`` entry of an index: TRUE/FALSE, or 2 (bzip2) / 3 (xz) as a number."""
    flag = value[0] if isinstance(value, list) and value else value
    if isinstance(flag, bool) or flag is None:
        return int(bool(flag))
    if isinstance(flag, (int, float)) and not math.isnan(flag) and int(flag) in (0, 1, 2, 3):
        return int(flag)
    raise RDataError(f"unknown lazy-load compression {value!r}")


def read_lazyload(rdx: Path, rdb: Path) -> dict[str, object]:
    """Every variable of a lazy-load database, by name."""
    try:
        index = unserialize(gzip.decompress(Path(rdx).read_bytes()))
        store = Path(rdb).read_bytes()
    except (OSError, EOFError, zlib.error) as exc:
        raise RDataError(f"cannot read the R lazy-load database {rdx}: {exc}") from None
    if not isinstance(index, dict) or not isinstance(index.get("variables"), dict):
        raise RDataError(f"{rdx} is not an R lazy-load index (no 'variables' list)")
    compression = _compression(index.get("compressed", [True]))
    values: dict[str, object] = {}
    for name, key in index["variables"].items():
        if not (isinstance(key, list) and len(key) == 2 and all(isinstance(k, (int, float)) for k in key)):
            raise RDataError(f"{rdx}: variable {name!r} has no (offset, length) key")
        offset, size = (int(k) for k in key)
        if offset < 0 or size < 0 or offset + size > len(store):
            raise RDataError(f"{rdb}: variable {name!r} lies outside the file (truncated download?)")
        values[str(name)] = unserialize(_decompress(store[offset : offset + size], compression))
    return values
