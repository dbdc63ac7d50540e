"""Tests for rwkv_jax.io.pth: torch-free, safe .pth reading and writing."""

from __future__ import annotations

import collections
import io
import os
import pickle
import pickletools
import re
import struct
import zipfile
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from rwkv_jax.io import pth
from rwkv_jax.io.pth import PthError, read_pth, write_pth

# numpy dtype <-> torch dtype name, for every dtype write_pth supports
_DTYPES = {
    "float64": np.dtype(np.float64),
    "float32": np.dtype(np.float32),
    "float16": np.dtype(np.float16),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "int64": np.dtype(np.int64),
    "int32": np.dtype(np.int32),
    "int16": np.dtype(np.int16),
    "int8": np.dtype(np.int8),
    "uint8": np.dtype(np.uint8),
    "bool": np.dtype(np.bool_),
}


def _torch():
    return pytest.importorskip("torch")


def _torch_bytes(t) -> bytes:
    """Raw bytes of a tensor in C order (works for bf16, bool and 0-d tensors)."""
    torch = _torch()
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _assert_matches_torch(arr: np.ndarray, t) -> None:
    assert arr.dtype == _DTYPES[str(t.dtype).removeprefix("torch.")]
    assert arr.shape == tuple(t.shape)
    assert arr.flags.c_contiguous
    assert arr.tobytes() == _torch_bytes(t)


def _sample_arrays() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    floats = rng.standard_normal((3, 5)).astype(np.float32)
    floats[0, :3] = [np.nan, -0.0, np.inf]  # bit patterns must survive, not just values
    ints = rng.integers(-100, 100, (3, 5))
    out = {f"m.{name}": (floats if dt.kind == "f" else ints).astype(dt) for name, dt in _DTYPES.items()}
    out["scalar"] = np.array(2.5, np.float16)
    out["empty"] = np.zeros((0, 4), ml_dtypes.bfloat16)
    out["rank4"] = np.arange(2 * 3 * 1 * 2, dtype=np.int32).reshape(2, 3, 1, 2)
    return out


def _data_offsets(path: Path) -> dict[str, int]:
    """File offset of each zip record's data, read from its local header."""
    offsets = {}
    with zipfile.ZipFile(path) as zf, open(path, "rb") as f:
        for info in zf.infolist():
            f.seek(info.header_offset)
            header = f.read(30)
            assert header[:4] == b"PK\x03\x04"
            name_len, extra_len = struct.unpack("<HH", header[26:30])
            offsets[info.filename] = info.header_offset + 30 + name_len + extra_len
    return offsets


def _rewrite_zip(src: Path, dst: Path, edit) -> None:
    """Copy a zip, passing each (name, data) through edit(); None drops the record."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for name in zin.namelist():
            data = edit(name, zin.read(name))
            if data is not None:
                zout.writestr(name, data)


def _write_zip(path: Path, records: dict[str, bytes]) -> None:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in records.items():
            zf.writestr(name, data)


# ------------------------------------------------------------------ torch.save -> read_pth


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16", "float64", "int64", "bool", "uint8"])
def test_read_torch_saved_dtypes(tmp_path: Path, dtype: str) -> None:
    torch = _torch()
    t = (torch.randn(4, 6) * 3).to(getattr(torch, dtype))
    sd = {"w": t, "scalar": t[1, 2].clone(), "empty": t[:0]}
    torch.save(sd, tmp_path / "m.pth")
    out = read_pth(tmp_path / "m.pth")
    assert list(out) == list(sd)
    for name, value in sd.items():
        _assert_matches_torch(out[name], value)
    assert out["scalar"].shape == () and out["empty"].shape == (0, 6)


def test_read_views_strides_and_shared_storages(tmp_path: Path) -> None:
    torch = _torch()
    base = torch.arange(24, dtype=torch.bfloat16).reshape(4, 6)
    sd = {
        "base": base,
        "odd_cols": base[:, 1::2],  # offset 1, strides (6, 2)
        "transposed": base.t(),  # saved without .contiguous()
        "tail": base.view(-1)[7:19].view(3, 4),  # shares the storage at an offset
        "tied": base,  # the very same tensor object under a second name
        "row": base[2],
    }
    torch.save(sd, tmp_path / "m.pth")
    out = read_pth(tmp_path / "m.pth")
    for name, value in sd.items():
        _assert_matches_torch(out[name], value)
    # Entries sharing a storage come back as independent arrays.
    out["base"][0, 0] = 99
    assert float(out["tied"][0, 0]) == 0 and float(out["transposed"][0, 0]) == 0


def test_expanded_tensor_is_refused_not_materialised(tmp_path: Path) -> None:
    # 4 bytes of storage stretched to 4 MB by stride 0: at (1e5, 1e5) it would ask for 40 GB.
    torch = _torch()
    torch.save({"w": torch.zeros(1).expand(1000, 1000)}, tmp_path / "m.pth")
    with pytest.raises(PthError, match=r"size \(1000, 1000\), stride \(0, 0\) has 1000000 elements but "
                                       r"its storage '0' holds only 1"):
        read_pth(tmp_path / "m.pth")


def test_read_file_saved_without_crc32(tmp_path: Path) -> None:
    torch = _torch()
    if not hasattr(torch.serialization, "set_crc32_options"):
        pytest.skip("this torch always writes CRC-32s")
    sd = {"emb.weight": torch.randn(7, 5), "x": torch.arange(3)}
    torch.serialization.set_crc32_options(False)
    try:
        torch.save(sd, tmp_path / "m.pth")
    finally:
        torch.serialization.set_crc32_options(True)
    with zipfile.ZipFile(tmp_path / "m.pth") as zf:  # the file really has no CRCs to check
        assert all(info.CRC == 0 for info in zf.infolist())
    out = read_pth(tmp_path / "m.pth")
    for name, value in sd.items():
        _assert_matches_torch(out[name], value)


def test_parameters_carrying_attributes_are_read(tmp_path: Path) -> None:
    # fla marks parameters with `_no_weight_decay = True`; torch pickles such an nn.Parameter
    # through _rebuild_parameter_with_state, which torch.load(weights_only=True) accepts.
    torch = _torch()
    linear = torch.nn.Linear(4, 3)
    linear.weight._no_weight_decay = True
    torch.save(dict(linear.named_parameters()), tmp_path / "m.pth")
    out = read_pth(tmp_path / "m.pth")
    for name, value in linear.named_parameters():
        _assert_matches_torch(out[name], value.detach())

    # Attributes are dropped unread, so only simple values may be there.
    linear.weight._no_weight_decay = torch.ones(2)
    torch.save(dict(linear.named_parameters()), tmp_path / "tensor_attribute.pth")
    with pytest.raises(PthError, match="parameter attributes must be a dict of simple values"):
        read_pth(tmp_path / "tensor_attribute.pth")


@pytest.mark.parametrize("dtype", ["complex64", "uint16", "float8_e4m3fn"])
def test_unsupported_torch_dtypes_are_named(tmp_path: Path, dtype: str) -> None:
    torch = _torch()
    if not hasattr(torch, dtype):
        pytest.skip(f"this torch has no {dtype}")
    torch.save({"w": torch.zeros(3).to(getattr(torch, dtype))}, tmp_path / "m.pth")
    with pytest.raises(PthError, match=f"unsupported tensor dtype {dtype}"):
        read_pth(tmp_path / "m.pth")


def test_forward_module_prefix_is_stripped(tmp_path: Path) -> None:
    torch = _torch()
    sd = {"_forward_module.blocks.0.att.key.weight": torch.ones(2), "head.weight": torch.zeros(1)}
    torch.save(sd, tmp_path / "m.pth")
    assert list(read_pth(tmp_path / "m.pth")) == ["blocks.0.att.key.weight", "head.weight"]

    torch.save({"_forward_module.x": torch.ones(2), "x": torch.ones(2)}, tmp_path / "dup.pth")
    with pytest.raises(PthError, match="'x' appears twice"):
        read_pth(tmp_path / "dup.pth")


def test_read_big_endian_checkpoint(tmp_path: Path) -> None:
    torch = _torch()
    sd = {"a": torch.randn(3, 2), "b": torch.arange(5, dtype=torch.int64), "c": torch.randn(4).bfloat16()}
    torch.save(sd, tmp_path / "le.pth")
    item_sizes = {"0": 4, "1": 8, "2": 2}  # storage key -> element size, in save order

    def to_big_endian(name: str, data: bytes) -> bytes:
        if name.endswith("/byteorder"):
            return b"big"
        if "/data/" in name:
            size = item_sizes[name.rsplit("/", 1)[1]]
            return np.frombuffer(data, np.dtype(f"u{size}")).byteswap().tobytes()
        return data

    _rewrite_zip(tmp_path / "le.pth", tmp_path / "be.pth", to_big_endian)
    out = read_pth(tmp_path / "be.pth")
    from_torch = torch.load(tmp_path / "be.pth")  # torch swaps back the same way
    for name, value in sd.items():
        _assert_matches_torch(out[name], value)
        _assert_matches_torch(out[name], from_torch[name])


# ------------------------------------------------------------------ write_pth


@pytest.mark.parametrize("mmap", [False, True])
@pytest.mark.parametrize("weights_only", [True, False])
def test_write_then_torch_load(tmp_path: Path, weights_only: bool, mmap: bool) -> None:
    torch = _torch()
    arrays = _sample_arrays()
    write_pth(tmp_path / "m.pth", arrays)
    loaded = torch.load(tmp_path / "m.pth", map_location="cpu", weights_only=weights_only, mmap=mmap)
    assert isinstance(loaded, dict) and list(loaded) == list(arrays)
    for name, arr in arrays.items():
        _assert_matches_torch(arr, loaded[name])


def test_write_then_read_is_bit_exact(tmp_path: Path) -> None:
    arrays = _sample_arrays()
    arrays["transposed"] = np.arange(12, dtype=np.float32).reshape(3, 4).T  # non-contiguous input
    arrays["big_endian"] = np.arange(6, dtype=">i4").reshape(2, 3)
    write_pth(tmp_path / "m.pth", arrays)
    out = read_pth(tmp_path / "m.pth")
    assert list(out) == list(arrays)
    for name, arr in arrays.items():
        assert out[name].shape == arr.shape
        if name == "big_endian":
            assert out[name].dtype == np.int32 and (out[name] == arr).all()
        else:
            assert out[name].dtype == arr.dtype
            assert out[name].tobytes() == np.ascontiguousarray(arr).tobytes()


def test_write_empty_dict(tmp_path: Path) -> None:
    write_pth(tmp_path / "m.pth", {})
    assert read_pth(tmp_path / "m.pth") == {}


def test_write_aligns_every_record(tmp_path: Path) -> None:
    write_pth(tmp_path / "m.pth", {f"t{i}": np.ones(i, np.float16) for i in range(5)})
    offsets = _data_offsets(tmp_path / "m.pth")
    assert len(offsets) == 5 + 3  # data.pkl, byteorder, version
    assert all(off % 64 == 0 for off in offsets.values()), offsets


def test_write_zip64_records_stay_aligned(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Records over 2 GiB get a zip64 local extra; force it on small ones to test the layout.
    torch = _torch()
    monkeypatch.setattr(pth, "_ZIP64_THRESHOLD", 0)
    arrays = _sample_arrays()
    write_pth(tmp_path / "m.pth", arrays)
    assert all(off % 64 == 0 for off in _data_offsets(tmp_path / "m.pth").values())
    loaded = torch.load(tmp_path / "m.pth", mmap=True)
    out = read_pth(tmp_path / "m.pth")
    for name, arr in arrays.items():
        _assert_matches_torch(arr, loaded[name])
        assert out[name].tobytes() == arr.tobytes()


def test_write_rejects_bad_input(tmp_path: Path) -> None:
    with pytest.raises(PthError, match="complex64"):
        write_pth(tmp_path / "m.pth", {"z": np.zeros(2, np.complex64)})
    with pytest.raises(PthError, match="not a string"):
        write_pth(tmp_path / "m.pth", {3: np.zeros(2)})
    assert not (tmp_path / "m.pth").exists()


# ------------------------------------------------------------------ malicious pickles


class _Exploit:
    """Pickles as a call of `func(arg)`: what a malicious checkpoint would contain."""

    def __init__(self, func, arg: str) -> None:
        self.func, self.arg = func, arg

    def __reduce__(self):
        return (self.func, (self.arg,))


def _exploit(kind: str, marker: Path) -> _Exploit:
    if kind == "system":
        return _Exploit(os.system, f"touch {marker}")
    return _Exploit(exec, f"open({str(marker)!r}, 'w').close()")


# Protocol 2 pickles name builtins by their Python 2 module, __builtin__; 4 uses STACK_GLOBAL.
@pytest.mark.parametrize(
    "kind, protocol, forbidden",
    [
        ("system", 2, "posix.system"),
        ("system", 4, "posix.system"),
        ("exec", 2, "__builtin__.exec"),
        ("exec", 4, "builtins.exec"),
    ],
)
def test_malicious_pickle_in_zip_is_refused(tmp_path: Path, kind: str, protocol: int, forbidden: str) -> None:
    marker = tmp_path / "pwned"
    payload = collections.OrderedDict(w=_exploit(kind, marker))
    _write_zip(
        tmp_path / "evil.pth",
        {"evil/data.pkl": pickle.dumps(payload, protocol=protocol), "evil/version": b"3\n"},
    )
    with pytest.raises(PthError, match=f"forbidden global {forbidden}"):
        read_pth(tmp_path / "evil.pth")
    assert not marker.exists()

    control = tmp_path / "control"  # the same payload, unpickled normally, does run
    pickle.loads(pickle.dumps(_exploit(kind, control), protocol=protocol))
    assert control.exists()


def test_malicious_plain_pickle_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    (tmp_path / "evil.pth").write_bytes(pickle.dumps(_exploit("system", marker), protocol=2))
    with pytest.raises(PthError, match="not a zip-format torch checkpoint"):
        read_pth(tmp_path / "evil.pth")
    assert not marker.exists()


# ------------------------------------------------------------------ corrupt files


def test_not_a_zip(tmp_path: Path) -> None:
    torch = _torch()
    (tmp_path / "noise.pth").write_bytes(np.random.default_rng(0).bytes(1000))
    torch.save({"a": torch.ones(2)}, tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
    for name in ["noise.pth", "legacy.pth"]:
        with pytest.raises(PthError, match="not a zip-format torch checkpoint"):
            read_pth(tmp_path / name)
    with pytest.raises(FileNotFoundError):  # I/O problems stay OSErrors
        read_pth(tmp_path / "absent.pth")


def test_truncated_file(tmp_path: Path) -> None:
    write_pth(tmp_path / "m.pth", {"a": np.ones((64, 64), np.float32)})
    data = (tmp_path / "m.pth").read_bytes()
    (tmp_path / "m.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(PthError, match="truncated or corrupt zip"):
        read_pth(tmp_path / "m.pth")


def test_missing_data_pkl(tmp_path: Path) -> None:
    write_pth(tmp_path / "m.pth", {"a": np.ones(3, np.float32)})
    _rewrite_zip(tmp_path / "m.pth", tmp_path / "bad.pth", lambda n, d: None if n.endswith("data.pkl") else d)
    with pytest.raises(PthError, match="no <prefix>/data.pkl"):
        read_pth(tmp_path / "bad.pth")


def test_missing_storage_record(tmp_path: Path) -> None:
    write_pth(tmp_path / "m.pth", {"a": np.ones(3, np.float32), "b": np.ones(2, np.float16)})
    _rewrite_zip(tmp_path / "m.pth", tmp_path / "bad.pth", lambda n, d: None if n.endswith("data/1") else d)
    with pytest.raises(PthError, match="'archive/data/1' is missing"):
        read_pth(tmp_path / "bad.pth")


def test_storage_record_too_short(tmp_path: Path) -> None:
    write_pth(tmp_path / "m.pth", {"a": np.ones(3, np.float32)})
    _rewrite_zip(tmp_path / "m.pth", tmp_path / "bad.pth", lambda n, d: d[:-4] if n.endswith("data/0") else d)
    with pytest.raises(PthError, match="holds 8 bytes but 3 x FloatStorage needs 12"):
        read_pth(tmp_path / "bad.pth")


def test_corrupted_storage_bytes(tmp_path: Path) -> None:
    write_pth(tmp_path / "m.pth", {"a": np.ones(16, np.float32)})
    data = bytearray((tmp_path / "m.pth").read_bytes())
    data[_data_offsets(tmp_path / "m.pth")["archive/data/0"]] ^= 0xFF  # caught by the zip CRC
    (tmp_path / "m.pth").write_bytes(bytes(data))
    with pytest.raises(PthError, match="corrupt checkpoint.*Bad CRC-32 for file 'archive/data/0'"):
        read_pth(tmp_path / "m.pth")


def _craft_pth(path: Path, size: tuple[int, ...], build_state: dict | None = None, offset: int = 0) -> Path:
    """A .pth whose tensor 'a' has `size` at `offset` over a 3-element float storage.

    With build_state, the pickle then applies BUILD(build_state) to the rebuilt tensor.
    """
    torch = _torch()

    class FakeTensor:
        def __reduce__(self):
            args = ("STORAGE", offset, size, (1,) * len(size), False, collections.OrderedDict())
            return (torch._utils._rebuild_tensor_v2, args, build_state)

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            return ("storage", torch.FloatStorage, "0", "cpu", 3) if obj == "STORAGE" else None

    data = io.BytesIO()
    Pickler(data, protocol=2).dump({"a": FakeTensor()})
    _write_zip(path, {"x/data.pkl": data.getvalue(), "x/data/0": bytes(12)})
    return path


def test_tensor_past_end_of_storage(tmp_path: Path) -> None:
    assert read_pth(_craft_pth(tmp_path / "ok.pth", (3,)))["a"].tolist() == [0, 0, 0]  # crafting is sound
    with pytest.raises(PthError, match="reaches element 4 but storage '0' holds only 3"):
        read_pth(_craft_pth(tmp_path / "shifted.pth", (3,), offset=1))
    with pytest.raises(PthError, match="has 10 elements but its storage '0' holds only 3"):
        read_pth(_craft_pth(tmp_path / "long.pth", (10,)))


def test_pickle_cannot_modify_rebuilt_objects(tmp_path: Path) -> None:
    # BUILD would otherwise grow a validated 3-element tensor into an out-of-bounds read.
    with pytest.raises(PthError, match=r"modify a _TensorRef \(BUILD opcode\)"):
        read_pth(_craft_pth(tmp_path / "grow.pth", (3,), build_state={"shape": (4000,)}))

    # ... or tamper with the allowed globals themselves, for this and later reads.
    # Each payload is GLOBAL, state, BUILD; `(None, {...})` is the setattr form of state.
    payloads = {
        b"ctorch._utils\n_rebuild_tensor_v2\n}X\x02\x00\x00\x00fnNsb": "modify a _AllowedCall",
        b"ctorch._utils\n_rebuild_tensor_v2\nN}X\x02\x00\x00\x00fnNs\x86b": "modify a _AllowedCall",
        b"ctorch\nFloatStorage\nN}X\x05\x00\x00\x00dtypeNs\x86b": "modify a _StorageType",
        b"ccollections\nOrderedDict\nN}X\x03\x00\x00\x00getNs\x86b": "immutable type 'collections.OrderedDict'",
    }
    for i, (ops, message) in enumerate(payloads.items()):
        pickletools.dis(b"\x80\x02" + ops + b".", out=io.StringIO())  # well-formed: one object left
        _write_zip(tmp_path / f"{i}.pth", {"x/data.pkl": b"\x80\x02" + ops + b"."})
        with pytest.raises(PthError, match=re.escape(message)):
            read_pth(tmp_path / f"{i}.pth")
    assert read_pth(_craft_pth(tmp_path / "after.pth", (3,)))["a"].shape == (3,)


@pytest.mark.parametrize(
    "obj, message",
    [
        (lambda torch: [torch.ones(2)], "top-level object has type list"),
        (lambda torch: {"w": torch.ones(2), "step": 3}, "value for key 'step' has type int"),
        (lambda torch: {"state_dict": {"w": torch.ones(2)}}, "value for key 'state_dict' has type dict"),
    ],
)
def test_not_a_flat_dict_of_tensors(tmp_path: Path, obj, message: str) -> None:
    torch = _torch()
    torch.save(obj(torch), tmp_path / "m.pth")
    with pytest.raises(PthError, match=message):
        read_pth(tmp_path / "m.pth")
