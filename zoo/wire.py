"""A reader of the protobuf wire format over a buffer, zero-copy for length-delimited fields.

Just enough for Caffe's NetParameter (the zoo-caffemodel plugin) and for splitting zoo's own ONNX files
into their top-level fields (zoo.backends.onnx.checked_copy): varints, fixed 32/64-bit and
length-delimited fields; groups (wire types 3 and 4) are refused. Every length is checked against the bytes that remain before it is
used, so a corrupt or hostile file cannot make the reader allocate beyond the file's own size.
"""

from __future__ import annotations

from zoo.errors import ZooError

VARINT, FIXED64, LENGTH, START_GROUP, END_GROUP, FIXED32 = 0, 1, 2, 3, 4, 5


class WireError(ZooError):
    pass


def read_varint(buf: memoryview, pos: int, end: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= end:
            raise WireError("truncated varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise WireError("varint longer than 10 bytes")


def varint_size(value: int) -> int:
    """Bytes of `value` as a varint."""
    return max(1, (value.bit_length() + 6) // 7)


def fields(buf: memoryview, start: int = 0, end: int | None = None):
    """Yield (field number, wire type, value) of one message: value is an int for varints and fixed
    fields, and the (start, end) span in `buf` for length-delimited ones (not copied)."""
    end = len(buf) if end is None else end
    pos = start
    while pos < end:
        key, pos = read_varint(buf, pos, end)
        number, wire = key >> 3, key & 7
        if number == 0:
            raise WireError(f"field number 0 at byte {pos}")
        if wire == VARINT:
            value, pos = read_varint(buf, pos, end)
        elif wire == FIXED64:
            if pos + 8 > end:
                raise WireError("truncated 64-bit field")
            value, pos = int.from_bytes(buf[pos:pos + 8], "little"), pos + 8
        elif wire == FIXED32:
            if pos + 4 > end:
                raise WireError("truncated 32-bit field")
            value, pos = int.from_bytes(buf[pos:pos + 4], "little"), pos + 4
        elif wire == LENGTH:
            length, pos = read_varint(buf, pos, end)
            if length > end - pos:
                raise WireError(f"field {number} claims {length:,} bytes where {end - pos:,} remain")
            value, pos = (pos, pos + length), pos + length
        else:
            raise WireError(f"unsupported wire type {wire} (field {number})")
        yield number, wire, value


def packed_varints(buf: memoryview, span: tuple[int, int]) -> list[int]:
    out, pos = [], span[0]
    while pos < span[1]:
        value, pos = read_varint(buf, pos, span[1])
        out.append(value)
    return out


def text(buf: memoryview, span: tuple[int, int]) -> str:
    try:
        return bytes(buf[span[0]:span[1]]).decode("utf8")
    except UnicodeDecodeError:
        raise WireError("a name is not UTF-8") from None
