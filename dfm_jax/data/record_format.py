"""A small self-describing binary record of named numpy arrays (no pickle).

Used for the latent ArrayRecord shards. One record (one example) is::

    b"DFMR"                       4-byte magic
    version                       1 byte (currently 1)
    header length N               uint32, little endian
    header                        N bytes of UTF-8 JSON:
                                  {"fields": [{"name": str, "dtype": str, "shape": [int]}]}
    payload                       each field's bytes in header order, C order, little endian

dtype names are numpy's ("float32", "int32", "uint8", ...) plus "bfloat16" (ml_dtypes) and
"utf8" for a Python string (shape []). Field sizes follow from dtype and shape, so a reader
can check the record length exactly. Decoding never executes code from the data.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping

import ml_dtypes
import numpy as np

MAGIC = b"DFMR"
VERSION = 1
_PREFIX = struct.Struct("<4sBI")
_STRING = "utf8"
#: dtypes a record may hold.
DTYPES: dict[str, np.dtype] = {
    name: np.dtype(name)
    for name in (
        "bool",
        "uint8",
        "int8",
        "uint16",
        "int16",
        "uint32",
        "int32",
        "uint64",
        "int64",
        "float16",
        "float32",
        "float64",
    )
}
DTYPES["bfloat16"] = np.dtype(ml_dtypes.bfloat16)


class RecordFormatError(ValueError):
    """A record is not a valid DFMR record (bad magic, version, header or length)."""


def dtype_name(dtype: np.dtype) -> str:
    """The record dtype name of a numpy dtype; TypeError when records cannot hold it."""
    for name, known in DTYPES.items():
        if dtype == known:
            return name
    raise TypeError(f"records cannot hold dtype {dtype}; supported: {sorted(DTYPES)}")


def encode(example: Mapping[str, np.ndarray | str | int | float]) -> bytes:
    """Serialises a dict of arrays (or scalars, or strings) to one record."""
    fields, chunks = [], []
    for name, value in example.items():
        if not isinstance(name, str):
            raise TypeError(f"field names must be strings, got {name!r}")
        if isinstance(value, str):
            data = value.encode("utf-8")
            fields.append({"name": name, "dtype": _STRING, "shape": [len(data)]})
            chunks.append(data)
            continue
        array = np.asarray(value)
        dtype = array.dtype.newbyteorder("<") if array.dtype.byteorder == ">" else array.dtype
        fields.append({"name": name, "dtype": dtype_name(dtype), "shape": list(array.shape)})
        chunks.append(np.ascontiguousarray(array, dtype=dtype.newbyteorder("<")).tobytes())
    header = json.dumps({"fields": fields}, separators=(",", ":")).encode("utf-8")
    return b"".join([_PREFIX.pack(MAGIC, VERSION, len(header)), header, *chunks])


def decode(record: bytes) -> dict[str, np.ndarray | str]:
    """Parses one record into a dict of (writable, native-endian) numpy arrays and strings."""
    record = bytes(record)
    if len(record) < _PREFIX.size:
        raise RecordFormatError(f"record of {len(record)} bytes is too short")
    magic, version, header_len = _PREFIX.unpack_from(record)
    if magic != MAGIC:
        raise RecordFormatError(f"bad record magic {magic!r}, expected {MAGIC!r}")
    if version != VERSION:
        raise RecordFormatError(f"record version {version} is not supported (expected {VERSION})")
    start = _PREFIX.size + header_len
    try:
        header = json.loads(record[_PREFIX.size : start].decode("utf-8"))
        fields = header["fields"]
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise RecordFormatError(f"bad record header: {e}") from e
    out: dict[str, np.ndarray | str] = {}
    offset = start
    for field in fields:
        try:
            name, type_name = str(field["name"]), str(field["dtype"])
            shape = tuple(int(d) for d in field["shape"])
        except (KeyError, TypeError, ValueError) as e:
            raise RecordFormatError(f"bad field description {field!r}: {e}") from e
        if any(d < 0 for d in shape):
            raise RecordFormatError(f"field {name!r} has a negative dimension: {shape}")
        if type_name != _STRING and type_name not in DTYPES:
            raise RecordFormatError(f"field {name!r}: unknown dtype {type_name!r}")
        count = int(np.prod(shape, dtype=np.int64))
        itemsize = 1 if type_name == _STRING else DTYPES[type_name].itemsize
        end = offset + count * itemsize
        if end > len(record):
            raise RecordFormatError(f"field {name!r} runs past the end of the record")
        if type_name == _STRING:
            try:
                out[name] = record[offset:end].decode("utf-8")
            except UnicodeDecodeError as e:
                raise RecordFormatError(f"field {name!r}: invalid UTF-8 ({e})") from e
        else:
            dtype = DTYPES[type_name].newbyteorder("<")
            array = np.frombuffer(record, dtype, count=count, offset=offset)
            out[name] = array.reshape(shape).astype(DTYPES[type_name])
        offset = end
    if offset != len(record):
        raise RecordFormatError(f"record has {len(record) - offset} trailing bytes")
    return out
