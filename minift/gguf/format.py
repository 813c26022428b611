"""The GGUF container, version 3 (and 2, read only): header, typed metadata, tensor table, data.

Layout, all little-endian: b"GGUF", version (u32), tensor count (u64), metadata count (u64); then
each metadata entry as key (u64 length + UTF-8), value type (u32), value; then each tensor as name,
number of dims (u32), dims (u64 each, innermost first: the reverse of numpy's order), ggml type
(u32) and offset (u64, from the start of the data section). The data section starts at the next
multiple of `general.alignment` (32 when absent) and each tensor starts on such a multiple.

Reading maps the file (np.memmap) and parses only the header; a tensor's bytes are a view into the
map until someone copies them. Writing takes each tensor's bytes from a callable at the moment it
is written, so an exporter holds one converted tensor at a time, and renames a finished temporary
file over the target (minift.files.atomic_write). Every error names the file and the field or the
byte offset it concerns.
"""
from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional, Union

import numpy as np

from minift.files import atomic_write

MAGIC = b"GGUF"
VERSION = 3
READ_VERSIONS = (2, 3)  # version 2 has version 3's layout; version 1 had 32-bit counts
DEFAULT_ALIGNMENT = 32
ALIGNMENT_KEY = "general.alignment"

# metadata value types
UINT8, INT8, UINT16, INT16, UINT32, INT32, FLOAT32, BOOL, STRING, ARRAY, UINT64, INT64, FLOAT64 = range(13)
_SCALARS = {UINT8: "<u1", INT8: "<i1", UINT16: "<u2", INT16: "<i2", UINT32: "<u4", INT32: "<i4",
            FLOAT32: "<f4", BOOL: "<u1", UINT64: "<u8", INT64: "<i8", FLOAT64: "<f8"}
VALUE_TYPE_NAMES = {UINT8: "UINT8", INT8: "INT8", UINT16: "UINT16", INT16: "INT16", UINT32: "UINT32",
                    INT32: "INT32", FLOAT32: "FLOAT32", BOOL: "BOOL", STRING: "STRING", ARRAY: "ARRAY",
                    UINT64: "UINT64", INT64: "INT64", FLOAT64: "FLOAT64"}

# ggml tensor types: id -> (name, elements per block, bytes per block). The whole table, not only
# the types minift converts: a reader must know every type's size to find the tensors after it.
GGML_TYPES: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20),
    6: ("Q5_0", 32, 22), 7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34), 9: ("Q8_1", 32, 40),
    10: ("Q2_K", 256, 84), 11: ("Q3_K", 256, 110), 12: ("Q4_K", 256, 144), 13: ("Q5_K", 256, 176),
    14: ("Q6_K", 256, 210), 15: ("Q8_K", 256, 292), 16: ("IQ2_XXS", 256, 66), 17: ("IQ2_XS", 256, 74),
    18: ("IQ3_XXS", 256, 98), 19: ("IQ1_S", 256, 50), 20: ("IQ4_NL", 32, 18), 21: ("IQ3_S", 256, 110),
    22: ("IQ2_S", 256, 82), 23: ("IQ4_XS", 256, 136), 24: ("I8", 1, 1), 25: ("I16", 1, 2),
    26: ("I32", 1, 4), 27: ("I64", 1, 8), 28: ("F64", 1, 8), 29: ("IQ1_M", 256, 56),
    30: ("BF16", 1, 2), 34: ("TQ1_0", 256, 54), 35: ("TQ2_0", 256, 66), 39: ("MXFP4", 32, 17),
    40: ("NVFP4", 64, 36), 41: ("Q1_0", 128, 18),
}
GGML_TYPE_IDS = {name: i for i, (name, _, _) in GGML_TYPES.items()}


@dataclass
class Field:
    """A metadata value with its GGUF type; `item_type` is the element type of an ARRAY."""

    value: Any
    type: int
    item_type: Optional[int] = None


@dataclass
class TensorInfo:
    """One entry of the tensor table. `shape` is in numpy order (rows first); `offset` counts
    from the start of the data section."""

    name: str
    shape: tuple[int, ...]
    type_id: int
    offset: int
    nbytes: int

    @property
    def type_name(self) -> str:
        return GGML_TYPES[self.type_id][0]


@dataclass
class TensorData:
    """A tensor to write: numpy-order `shape`, ggml type name, and its bytes (an array of any
    dtype whose buffer is the encoded tensor, or a callable returning one when it is written)."""

    name: str
    shape: tuple[int, ...]
    type_name: str
    data: Union[np.ndarray, Callable[[], np.ndarray]]


def tensor_nbytes(type_id: int, shape: tuple[int, ...], where: str) -> int:
    """Bytes of a tensor of ggml type `type_id` and numpy-order `shape`; ValueError naming
    `where` when the type is unknown or the rows are not whole blocks."""
    if type_id not in GGML_TYPES:
        raise ValueError(f"{where}: unknown ggml type id {type_id}")
    name, block, size = GGML_TYPES[type_id]
    row = shape[-1] if shape else 1
    if row % block:
        raise ValueError(f"{where}: rows of {row} elements are not whole {name} blocks of {block}")
    return math.prod(shape) // block * size


def _align(n: int, alignment: int) -> int:
    return -(-n // alignment) * alignment


class _Cursor:
    """Sequential little-endian reads over the mapped header; errors name the file and offset."""

    def __init__(self, buf: np.ndarray, path: str):
        self.buf, self.path, self.pos = buf, path, 0

    def take(self, n: int, what: str) -> bytes:
        end = self.pos + n
        if n < 0 or end > len(self.buf):
            raise ValueError(f"{self.path}: truncated: {what} needs bytes {self.pos}..{end} but the "
                             f"file has {len(self.buf)}")
        data = self.buf[self.pos:end].tobytes()
        self.pos = end
        return data

    def scalar(self, type_id: int, what: str):
        fmt = _SCALARS[type_id]
        value = np.frombuffer(self.take(int(fmt[-1]), what), fmt)[0].item()
        return bool(value) if type_id == BOOL else value

    def string(self, what: str) -> str:
        start = self.pos
        n = self.scalar(UINT64, f"{what} (length)")
        try:
            return self.take(n, what).decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError(f"{self.path}: {what} at byte {start} is not valid UTF-8") from None

    def value(self, type_id: int, what: str):
        if type_id in _SCALARS:
            return self.scalar(type_id, what)
        if type_id == STRING:
            return self.string(what)
        raise ValueError(f"{self.path}: {what}: unknown metadata value type {type_id} at byte "
                         f"{self.pos - 4}")

    def array(self, what: str) -> Field:
        at = self.pos
        item = self.scalar(UINT32, f"{what} (element type)")
        n = self.scalar(UINT64, f"{what} (length)")
        if item in _SCALARS:  # one read for the whole array
            fmt = _SCALARS[item]
            values = np.frombuffer(self.take(n * int(fmt[-1]), what), fmt)
            return Field((values != 0).tolist() if item == BOOL else values.tolist(), ARRAY, item)
        if item == STRING:
            return Field([self.string(f"{what}[{i}]") for i in range(n)], ARRAY, item)
        raise ValueError(f"{self.path}: {what}: arrays of value type {item} are not supported "
                         f"(array at byte {at})")


class GGUFFile:
    """A GGUF file opened for reading: `metadata` (key -> value), `fields` (key -> Field, with the
    types), `tensors` (name -> TensorInfo, in file order), `alignment`, `data_start`, `version`.
    `raw(name)` is a tensor's encoded bytes as a read-only view of the mapped file."""

    def __init__(self, path):
        self.path = str(path)
        try:
            self._map = np.memmap(self.path, dtype=np.uint8, mode="r")
        except FileNotFoundError:
            raise FileNotFoundError(f"GGUF file {self.path} does not exist") from None
        except ValueError:  # numpy cannot map an empty file
            raise ValueError(f"{self.path}: truncated: the file is empty") from None
        c = _Cursor(self._map, self.path)
        magic = c.take(4, "magic")
        if magic != MAGIC:
            raise ValueError(f"{self.path}: not a GGUF file (bad magic {magic!r} at byte 0, "
                             f"expected {MAGIC!r})")
        self.version = c.scalar(UINT32, "version")
        if self.version not in READ_VERSIONS:
            swapped = int.from_bytes(self.version.to_bytes(4, "little"), "big")
            why = " (a big-endian file, which is not supported)" if swapped in READ_VERSIONS else ""
            raise ValueError(f"{self.path}: unsupported GGUF version {self.version} at byte 4{why}; "
                             f"minift reads versions {', '.join(map(str, READ_VERSIONS))}")
        n_tensors = c.scalar(UINT64, "tensor count")
        n_fields = c.scalar(UINT64, "metadata count")
        self.fields: dict[str, Field] = {}
        for i in range(n_fields):
            key = c.string(f"metadata entry {i} key")
            type_id = c.scalar(UINT32, f"metadata {key!r} type")
            self.fields[key] = (c.array(f"metadata {key!r}") if type_id == ARRAY else
                                Field(c.value(type_id, f"metadata {key!r}"), type_id))
        self.metadata = {k: f.value for k, f in self.fields.items()}
        self.alignment = self.metadata.get(ALIGNMENT_KEY, DEFAULT_ALIGNMENT)
        if not isinstance(self.alignment, int) or self.alignment <= 0 or self.alignment % 8:
            raise ValueError(f"{self.path}: metadata {ALIGNMENT_KEY!r} must be a positive multiple of "
                             f"8, got {self.alignment!r}")
        infos = [self._tensor_info(c, i) for i in range(n_tensors)]
        self.data_start = _align(c.pos, self.alignment)
        self.tensors: dict[str, TensorInfo] = {}
        for info in infos:
            self._check_placement(info)
            self.tensors[info.name] = info

    def _tensor_info(self, c: _Cursor, i: int) -> TensorInfo:
        name = c.string(f"tensor {i} name")
        n_dims = c.scalar(UINT32, f"tensor {name!r} dims count")
        if n_dims > 8:
            raise ValueError(f"{self.path}: tensor {name!r} has {n_dims} dims (at most 8 exist)")
        dims = [c.scalar(UINT64, f"tensor {name!r} dim {d}") for d in range(n_dims)]
        type_id = c.scalar(UINT32, f"tensor {name!r} type")
        offset = c.scalar(UINT64, f"tensor {name!r} offset")
        shape = tuple(reversed(dims))
        nbytes = tensor_nbytes(type_id, shape, f"{self.path}: tensor {name!r}")
        return TensorInfo(name, shape, type_id, offset, nbytes)

    def _check_placement(self, info: TensorInfo) -> None:
        if info.name in self.tensors:
            raise ValueError(f"{self.path}: tensor {info.name!r} appears twice in the tensor table")
        if info.offset % self.alignment:
            raise ValueError(f"{self.path}: tensor {info.name!r} offset {info.offset} is not a "
                             f"multiple of the alignment {self.alignment}")
        start = self.data_start + info.offset
        if start + info.nbytes > len(self._map):
            raise ValueError(f"{self.path}: tensor {info.name!r} data (bytes {start}..{start + info.nbytes}) "
                             f"runs past the end of the file ({len(self._map)} bytes); the file is "
                             f"truncated")

    def raw(self, name: str) -> np.ndarray:
        """The tensor's encoded bytes (uint8, read-only view of the map)."""
        info = self.tensors[name]
        start = self.data_start + info.offset
        return self._map[start:start + info.nbytes]

    def close(self) -> None:
        """Release the mapping (views taken from `raw` keep it alive until they are dropped)."""
        self._map = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def read_gguf(path) -> GGUFFile:
    """Open a GGUF file: the header is parsed now, tensor data is read when used."""
    return GGUFFile(path)


def _infer(key: str, value) -> Field:
    """The GGUF type of a plain Python value (a Field passes through unchanged)."""
    if isinstance(value, Field):
        return value
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if isinstance(value, (list, tuple)):
        if not value:
            raise ValueError(f"metadata {key!r}: an empty list needs its element type; pass a "
                             f"Field(value, ARRAY, item_type)")
        kinds = {_infer(key, v).type for v in value}
        if kinds <= {UINT32, INT64}:  # integers: INT32 as llama.cpp writes them, wider if needed
            wide = any(not -2**31 <= v < 2**31 for v in value)
            return Field(list(value), ARRAY, INT64 if wide else INT32)
        if len(kinds) != 1 or ARRAY in kinds:
            raise ValueError(f"metadata {key!r}: list elements must share one scalar type")
        return Field(list(value), ARRAY, kinds.pop())
    if isinstance(value, bool):
        return Field(value, BOOL)
    if isinstance(value, int):
        return Field(value, UINT32 if 0 <= value < 2**32 else INT64)
    if isinstance(value, float):
        return Field(value, FLOAT32)
    if isinstance(value, str):
        return Field(value, STRING)
    raise ValueError(f"metadata {key!r}: cannot store a {type(value).__name__} in GGUF")


def _pack_string(s: str) -> bytes:
    data = s.encode("utf-8")
    return struct.pack("<Q", len(data)) + data


def _pack_value(key: str, f: Field) -> bytes:
    if f.type == ARRAY:
        head = struct.pack("<IQ", f.item_type, len(f.value))
        if f.item_type == STRING:
            return head + b"".join(_pack_string(v) for v in f.value)
        if f.item_type not in _SCALARS:
            raise ValueError(f"metadata {key!r}: unknown array element type {f.item_type}")
        return head + _pack_numbers(key, f.value, f.item_type)
    if f.type == STRING:
        return _pack_string(f.value)
    if f.type not in _SCALARS:
        raise ValueError(f"metadata {key!r}: unknown value type {f.type}")
    return _pack_numbers(key, [f.value], f.type)


def _pack_numbers(key: str, values, type_id: int) -> bytes:
    fmt = _SCALARS[type_id]
    if fmt[1] in "iu":
        info = np.iinfo(fmt)
        bad = [v for v in values if not isinstance(v, (int, np.integer)) or not info.min <= v <= info.max]
        if bad:
            raise ValueError(f"metadata {key!r}: {bad[0]!r} is not a {VALUE_TYPE_NAMES[type_id]}")
    return np.asarray(values, dtype=fmt).tobytes()


def write_gguf(path, metadata: dict[str, Any], tensors: Iterable[TensorData],
               alignment: Optional[int] = None) -> None:
    """Write a GGUF v3 file atomically.

    Args:
        metadata: key -> value; a plain value gets its type from `_infer` (int -> UINT32, or INT64
            when it does not fit; float -> FLOAT32; lists -> ARRAY of their elements' type), a
            Field states it. `general.alignment` is written when `alignment` is not 32.
        tensors: TensorData in file order; each one's data is taken (called) only when written.
        alignment: data alignment (default: metadata's general.alignment, else 32).
    """
    tensors = list(tensors)
    metadata = dict(metadata)
    alignment = alignment or (metadata[ALIGNMENT_KEY].value if isinstance(metadata.get(ALIGNMENT_KEY), Field)
                              else metadata.get(ALIGNMENT_KEY, DEFAULT_ALIGNMENT))
    if not isinstance(alignment, int) or alignment <= 0 or alignment % 8:
        raise ValueError(f"{path}: alignment must be a positive multiple of 8, got {alignment!r}")
    if alignment != DEFAULT_ALIGNMENT:
        metadata[ALIGNMENT_KEY] = Field(alignment, UINT32)
    header = [MAGIC, struct.pack("<IQQ", VERSION, len(tensors), len(metadata))]
    for key, value in metadata.items():
        f = _infer(key, value)
        header += [_pack_string(key), struct.pack("<I", f.type), _pack_value(key, f)]
    offset, sizes, names = 0, [], set()
    for t in tensors:
        if t.type_name not in GGML_TYPE_IDS:
            raise ValueError(f"{path}: tensor {t.name!r}: unknown ggml type {t.type_name!r}")
        if t.name in names:
            raise ValueError(f"{path}: tensor {t.name!r} is given twice")
        names.add(t.name)
        type_id = GGML_TYPE_IDS[t.type_name]
        size = tensor_nbytes(type_id, tuple(t.shape), f"{path}: tensor {t.name!r}")
        dims = list(reversed(t.shape))
        header += [_pack_string(t.name), struct.pack(f"<I{len(dims)}QIQ", len(dims), *dims, type_id, offset)]
        sizes.append(size)
        offset = _align(offset + size, alignment)
    head = b"".join(header)
    head += bytes(_align(len(head), alignment) - len(head))

    def write(tmp: str) -> None:
        with open(tmp, "wb") as out:
            out.write(head)
            for t, size in zip(tensors, sizes):
                data = t.data() if callable(t.data) else t.data
                buf = np.ascontiguousarray(data).view(np.uint8).reshape(-1)
                if buf.size != size:
                    raise ValueError(f"{path}: tensor {t.name!r}: got {buf.size} bytes of data, "
                                     f"{t.type_name} {tuple(t.shape)} takes {size}")
                out.write(memoryview(buf))
                out.write(bytes(_align(size, alignment) - size))

    atomic_write(path, write)
