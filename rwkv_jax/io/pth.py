"""Torch-free, safe reading and writing of PyTorch ``.pth`` state_dict checkpoints.

A file written by ``torch.save(state_dict)`` (torch >= 1.6) is a zip archive with a
single top-level folder ``<prefix>/`` holding:

* ``data.pkl`` - a protocol-2 pickle of the object. Tensors are pickled as
  ``torch._utils._rebuild_tensor_v2(storage, storage_offset, size, stride,
  requires_grad, backward_hooks[, metadata])`` and each storage as a persistent id
  ``('storage', torch.<Type>Storage, key, location, numel)``;
* ``data/<key>`` - the raw bytes of every storage;
* ``version``, ``byteorder`` (absent in old files, meaning little-endian) and, in
  newer files, ``.data/serialization_id``, ``.format_version`` and
  ``.storage_alignment``.

Reading never imports torch and never executes pickled code: the unpickler only
resolves a short allow-list of globals, each mapped to a local stand-in that
records what to build, so a malicious ``data.pkl`` cannot call anything else.
"""

from __future__ import annotations

import collections
import copy
import io
import math
import os
import pickle
import struct
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import ml_dtypes
import numpy as np

__all__ = ["PthError", "read_pth", "write_pth"]


class PthError(ValueError):
    """A ``.pth`` file could not be read or written safely."""


# torch's legacy typed-storage class names <-> element dtypes. torch (up to at least
# 2.13) still names the typed class, e.g. ``torch.BFloat16Storage``, in the
# persistent id of every tensor storage, even though storages are untyped in memory.
_STORAGE_DTYPES: dict[str, np.dtype] = {
    "DoubleStorage": np.dtype(np.float64),
    "FloatStorage": np.dtype(np.float32),
    "HalfStorage": np.dtype(np.float16),
    "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "LongStorage": np.dtype(np.int64),
    "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16),
    "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8),
    "BoolStorage": np.dtype(np.bool_),
}
_DTYPE_STORAGES: dict[np.dtype, str] = {dt: name for name, dt in _STORAGE_DTYPES.items()}
# torch storage classes and dtypes that a genuine checkpoint may name but that we cannot read:
# they get an "unsupported tensor dtype" error rather than the "forbidden global" of a foreign
# name, which would read like a security block. The storages' element dtypes, by class name:
_UNSUPPORTED_STORAGES = {
    "ComplexFloatStorage": "complex64", "ComplexDoubleStorage": "complex128", "QInt8Storage": "qint8",
    "QUInt8Storage": "quint8", "QInt32Storage": "qint32", "QUInt4x2Storage": "quint4x2",
    "QUInt2x4Storage": "quint2x4",
}
# Tensors of dtypes without a legacy typed storage (torch.storage._new_dtypes()) are pickled as
# `_rebuild_tensor_v3(<untyped storage>, ..., torch.<dtype>)`; these are the dtype names.
_V3_DTYPE_NAMES = frozenset({
    "uint16", "uint32", "uint64", "float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2", "float8_e5m2fnuz",
    "float8_e8m0fnu", "float4_e2m1fn_x2", "complex32", "bits1x8", "bits2x4", "bits4x2", "bits8", "bits16",
    *(f"int{n}" for n in range(1, 8)), *(f"uint{n}" for n in range(1, 8)),
})

_FORWARD_MODULE_PREFIX = "_forward_module."  # added by Lightning/DeepSpeed wrappers


# --------------------------------------------------------------------------- reading


def _refuse_build(self: object, state: object) -> None:
    # pickle's BUILD opcode rewrites an already-built object's attributes, and does so
    # even for frozen dataclasses; allowing it would let a file change a tensor's
    # shape after it was validated, or tamper with the shared stand-ins below.
    raise PthError(f"pickle tries to modify a {type(self).__name__} (BUILD opcode)")


@dataclass(frozen=True)
class _AllowedCall:
    """An allowed pickle global that may be called (REDUCE) but never modified."""

    fn: Callable[..., Any]
    __setstate__ = _refuse_build

    def __call__(self, *args: Any) -> Any:
        return self.fn(*args)


@dataclass(frozen=True)
class _StorageType:
    """Stand-in for a ``torch.<Type>Storage`` class: only ever used as a marker."""

    name: str
    dtype: np.dtype
    __setstate__ = _refuse_build


@dataclass(frozen=True)
class _TorchDtype:
    """Stand-in for a ``torch.<dtype>`` object: only ever used as a marker."""

    name: str
    __setstate__ = _refuse_build


@dataclass(frozen=True)
class _StorageRef:
    """A storage named by a persistent id; its bytes are read only when needed."""

    key: str
    member: zipfile.ZipInfo
    dtype: np.dtype
    numel: int
    __setstate__ = _refuse_build


@dataclass(frozen=True)
class _TensorRef:
    """What ``_rebuild_tensor_v2`` was asked to build, in elements (not bytes)."""

    storage: _StorageRef
    offset: int
    shape: tuple[int, ...]
    strides: tuple[int, ...]
    __setstate__ = _refuse_build


def _is_count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _int_tuple(value: Any, what: str) -> tuple[int, ...]:
    if not (isinstance(value, tuple) and all(map(_is_count, value))):
        raise PthError(f"tensor {what} must be a tuple of non-negative ints, got {value!r}")
    return value


def _rebuild_tensor(storage: Any, storage_offset: Any, size: Any, stride: Any) -> _TensorRef:
    """Stand-in for ``torch._utils._rebuild_tensor``: records what to build, reads nothing."""
    if not isinstance(storage, _StorageRef):
        raise PthError(f"tensor storage must be a persistent storage id, got {type(storage).__name__}")
    if not _is_count(storage_offset):
        raise PthError(f"tensor storage_offset must be a non-negative int, got {storage_offset!r}")
    shape = _int_tuple(size, "size")
    strides = _int_tuple(stride, "stride")
    if len(shape) != len(strides):
        raise PthError(f"tensor size {shape} and stride {strides} differ in rank")
    # Only zero or overlapping strides (expand(), as_strided) fit more elements than their storage
    # holds; a state_dict never needs them, and reading them would let a 1 KB file ask for
    # gigabytes (each view is materialised as an independent array).
    numel = math.prod(shape)
    if numel > storage.numel:
        raise PthError(
            f"tensor of size {shape}, stride {strides} has {numel} elements but its storage {storage.key!r} "
            f"holds only {storage.numel} (a corrupt file, or an expanded or overlapping view: save those "
            "with .contiguous())"
        )
    return _TensorRef(storage, storage_offset, shape, strides)


def _rebuild_tensor_v2(
    storage: Any,
    storage_offset: Any,
    size: Any,
    stride: Any,
    requires_grad: Any,
    backward_hooks: Any,
    metadata: Any = None,
) -> _TensorRef:
    """Stand-in for ``torch._utils._rebuild_tensor_v2``; autograd fields are irrelevant here."""
    return _rebuild_tensor(storage, storage_offset, size, stride)


def _rebuild_tensor_v3(
    storage: Any,
    storage_offset: Any,
    size: Any,
    stride: Any,
    requires_grad: Any,
    backward_hooks: Any,
    dtype: Any,
    metadata: Any = None,
) -> _TensorRef:
    """Stand-in for ``torch._utils._rebuild_tensor_v3``, which torch uses only for dtypes we cannot hold."""
    if isinstance(dtype, _TorchDtype):
        raise PthError(f"unsupported tensor dtype {dtype.name}")
    raise PthError(f"_rebuild_tensor_v3 dtype must be a torch dtype, got {type(dtype).__name__}")


def _rebuild_parameter(data: Any, requires_grad: Any, backward_hooks: Any) -> _TensorRef:
    """Stand-in for ``torch._utils._rebuild_parameter`` (a dict holding ``nn.Parameter``s)."""
    if not isinstance(data, _TensorRef):
        raise PthError(f"parameter data must be a tensor, got {type(data).__name__}")
    return data


_SIMPLE_ATTRIBUTE_TYPES = (type(None), bool, int, float, str)


def _rebuild_parameter_with_state(data: Any, requires_grad: Any, backward_hooks: Any, state: Any) -> _TensorRef:
    """Stand-in for ``torch._utils._rebuild_parameter_with_state``: an ``nn.Parameter`` carrying
    Python attributes (fla marks some with ``_no_weight_decay = True``).

    The attributes say nothing about the values, so they are dropped; they are only checked to be
    a plain dict of simple values (anything built by an allowed global, e.g. a tensor, is refused).
    """
    if not (
        isinstance(state, dict)
        and all(isinstance(k, str) and type(v) in _SIMPLE_ATTRIBUTE_TYPES for k, v in state.items())
    ):
        raise PthError(f"parameter attributes must be a dict of simple values, got {state!r}")
    return _rebuild_parameter(data, requires_grad, backward_hooks)


_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    # The real class is safe to hand out: it is an immutable C type.
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _AllowedCall(_rebuild_tensor_v2),
    ("torch._utils", "_rebuild_tensor"): _AllowedCall(_rebuild_tensor),
    ("torch._utils", "_rebuild_parameter"): _AllowedCall(_rebuild_parameter),
    ("torch._utils", "_rebuild_parameter_with_state"): _AllowedCall(_rebuild_parameter_with_state),
    ("torch._utils", "_rebuild_tensor_v3"): _AllowedCall(_rebuild_tensor_v3),
    **{("torch", name): _StorageType(name, dt) for name, dt in _STORAGE_DTYPES.items()},
    # torch.load reads an untyped storage as bytes; torch.save names one only for the tensors it
    # pickles with _rebuild_tensor_v3, which are refused.
    ("torch.storage", "UntypedStorage"): _StorageType("UntypedStorage", np.dtype(np.uint8)),
    **{("torch", name): _TorchDtype(name) for name in _V3_DTYPE_NAMES},
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the globals tensor reconstruction needs.

    ``find_class`` is the single choke point through which every opcode that names
    a callable or class (GLOBAL, STACK_GLOBAL, INST, OBJ, EXT*) passes, so refusing
    there stops a payload before anything it names can be called.
    """

    def __init__(self, file: io.BufferedIOBase, archive: _Archive) -> None:
        super().__init__(file)
        self._archive = archive

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            if module == "torch" and name in _UNSUPPORTED_STORAGES:
                raise PthError(f"unsupported tensor dtype {_UNSUPPORTED_STORAGES[name]} (torch.{name})") from None
            raise PthError(
                f"refusing to load forbidden global {module}.{name} "
                "(only tensor-rebuilding globals are allowed)"
            ) from None

    def persistent_load(self, pid: Any) -> _StorageRef:
        return self._archive.storage_ref(pid)


class _Archive:
    """An open zip checkpoint: locates records and validates storage ids against them."""

    def __init__(self, zf: zipfile.ZipFile) -> None:
        self._zf = zf
        pickles = [n for n in zf.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pickles) != 1:
            what = "no <prefix>/data.pkl" if not pickles else f"several data.pkl records {pickles}"
            raise PthError(f"{what}; not a torch.save checkpoint")
        self.prefix = pickles[0][: -len("data.pkl")]
        self.little_endian = self._read_byteorder()
        self._storages: dict[str, _StorageRef] = {}

    def _open(self, member: zipfile.ZipInfo) -> zipfile.ZipExtFile:
        """Open a record, checking its CRC-32 unless the writer left it out.

        ``torch.serialization.set_crc32_options(False)`` (torch >= 2.5) stores a CRC of 0 and
        torch.load skips the check; zipfile skips it only for a ZipInfo without a CRC.
        """
        if member.CRC == 0:
            member = copy.copy(member)
            del member.CRC
        return self._zf.open(member)

    def _read(self, name: str) -> bytes:
        with self._open(self._zf.getinfo(name)) as f:
            return f.read()

    def _read_byteorder(self) -> bool:
        try:
            order = self._read(self.prefix + "byteorder")
        except KeyError:
            return True  # files from before torch recorded it are little-endian
        if order not in (b"little", b"big"):
            raise PthError(f"unknown byteorder record {order!r}")
        return order == b"little"

    def load_pickle(self) -> Any:
        data = self._read(self.prefix + "data.pkl")
        return _RestrictedUnpickler(io.BytesIO(data), self).load()

    def storage_ref(self, pid: Any) -> _StorageRef:
        """Validate a persistent id against the archive and return (a cached) ref to it."""
        if not (
            isinstance(pid, tuple)
            and len(pid) == 5
            and pid[0] == "storage"
            and isinstance(pid[1], _StorageType)
            and isinstance(pid[2], str)
            and _is_count(pid[4])
        ):
            raise PthError(f"unsupported persistent id {pid!r}")
        _, storage_type, key, _location, numel = pid
        ref = self._storages.get(key)
        if ref is None:
            name = f"{self.prefix}data/{key}"
            try:
                member = self._zf.getinfo(name)
            except KeyError:
                raise PthError(f"storage record {name!r} is missing") from None
            nbytes = numel * storage_type.dtype.itemsize
            if member.file_size != nbytes:
                raise PthError(
                    f"storage record {name!r} holds {member.file_size} bytes but "
                    f"{numel} x {storage_type.name} needs {nbytes} (truncated or corrupt file)"
                )
            ref = self._storages[key] = _StorageRef(key, member, storage_type.dtype, numel)
        elif (ref.dtype, ref.numel) != (storage_type.dtype, numel):
            raise PthError(f"storage {key!r} is referenced with conflicting types")
        return ref

    def read_storage(self, ref: _StorageRef) -> np.ndarray:
        """Read a storage record into a fresh, writable, native-endian flat array."""
        buf = np.empty(ref.member.file_size, np.uint8)
        # Read in chunks straight into the final buffer: zf.read() would hold a second
        # full-size copy of what can be a multi-GB embedding matrix.
        with self._open(ref.member) as f:
            pos = 0
            while pos < buf.size:
                chunk = f.read(min(1 << 24, buf.size - pos))
                if not chunk:
                    raise PthError(f"storage record {ref.member.filename!r} is truncated")
                buf[pos : pos + len(chunk)] = np.frombuffer(chunk, np.uint8)
                pos += len(chunk)
        if not self.little_endian and ref.dtype.itemsize > 1:
            buf.view(f"u{ref.dtype.itemsize}").byteswap(inplace=True)
        return buf.view(ref.dtype)


def _materialize(ref: _TensorRef, flat: np.ndarray, sole_user: bool) -> np.ndarray:
    """Apply offset/size/stride to a flat storage and return a C-contiguous array."""
    # as_strided does no bounds checking, so this check is all that stands between a
    # crafted size/stride and reading arbitrary process memory: keep it right here.
    if 0 not in ref.shape:
        end = ref.offset + sum((n - 1) * s for n, s in zip(ref.shape, ref.strides)) + 1
        if end > flat.size:
            raise PthError(
                f"tensor of size {ref.shape}, stride {ref.strides} at offset {ref.offset} reaches "
                f"element {end} but storage {ref.storage.key!r} holds only {flat.size} (corrupt file)"
            )
    itemsize = flat.itemsize
    view = np.lib.stride_tricks.as_strided(
        flat[ref.offset :], ref.shape, tuple(s * itemsize for s in ref.strides), writeable=False
    )
    if sole_user and ref.offset == 0 and view.size == flat.size and view.flags.c_contiguous:
        return flat.reshape(ref.shape)  # the whole storage, in order: hand it over uncopied
    return view.copy()


def _open_zip(path: str, f: io.BufferedReader) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(f)
    except Exception as e:  # BadZipFile, or whatever a mangled central directory triggers
        f.seek(0)
        if f.read(2) == b"PK":
            raise PthError(f"{path}: truncated or corrupt zip archive ({e})") from e
        raise PthError(
            f"{path}: not a zip-format torch checkpoint (a legacy torch<1.6 file, a plain "
            "pickle or not a checkpoint at all; re-save it with a recent torch.save)"
        ) from e


def _read_state_dict(zf: zipfile.ZipFile) -> dict[str, np.ndarray]:
    archive = _Archive(zf)
    obj = archive.load_pickle()
    if not isinstance(obj, dict):
        raise PthError(f"top-level object has type {type(obj).__name__}, not a dict of tensors")
    refs: dict[str, _TensorRef] = {}
    for name, value in obj.items():
        if not isinstance(name, str):
            raise PthError(f"key {name!r} is not a string")
        if not isinstance(value, _TensorRef):
            raise PthError(f"value for key {name!r} has type {type(value).__name__}, not a tensor")
        name = name.removeprefix(_FORWARD_MODULE_PREFIX)
        if name in refs:
            raise PthError(f"key {name!r} appears twice once {_FORWARD_MODULE_PREFIX!r} is stripped")
        refs[name] = value

    # Read each storage once, when first needed, and drop it after its last tensor,
    # so peak memory stays near the size of the result rather than twice it.
    uses = collections.Counter(ref.storage.key for ref in refs.values())
    storages: dict[str, np.ndarray] = {}
    out: dict[str, np.ndarray] = {}
    for name, ref in refs.items():
        key = ref.storage.key
        if key not in storages:
            storages[key] = archive.read_storage(ref.storage)
        out[name] = _materialize(ref, storages[key], sole_user=uses[key] == 1)
        uses[key] -= 1
        if uses[key] == 0:
            del storages[key]
    return out


def read_pth(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read a torch.save'd state_dict WITHOUT torch and WITHOUT executing pickled code.

    Returns a dict mapping each name (with any ``_forward_module.`` prefix removed)
    to a C-contiguous numpy array; bfloat16 comes back as ``ml_dtypes.bfloat16``.
    Views, strided and storage-sharing tensors are resolved into independent arrays;
    views with more elements than their storage (``expand()``) are refused. Records
    are CRC-checked unless saved without CRCs (``set_crc32_options(False)``).

    Raises:
        PthError: the file is not a zip torch checkpoint, is truncated or corrupt,
            names a forbidden pickle global, holds a tensor of a dtype other than
            those ``write_pth`` supports or an expanded view, or is not a flat dict
            of tensors.
        OSError: the file cannot be opened.
    """
    path = os.fspath(path)
    with open(path, "rb") as f, _open_zip(path, f) as zf:
        try:
            return _read_state_dict(zf)
        except PthError as e:
            raise PthError(f"{path}: {e}") from None
        except Exception as e:  # whatever pickle, zipfile or numpy raise on bad bytes
            raise PthError(f"{path}: corrupt checkpoint ({type(e).__name__}: {e})") from e


# --------------------------------------------------------------------------- writing
#
# The standard pickle.Pickler only emits a GLOBAL opcode for an object it can
# re-import and find to be identical (it would import torch), so the few opcodes a
# state_dict needs are written directly. The stream mirrors torch.save's.

_ARCHIVE_PREFIX = "archive/"  # what torch.save uses for file objects; torch.load accepts any
_ALIGNMENT = 64  # as torch.save: tensors memory-mapped by torch.load(mmap=True) stay aligned
_LOCAL_HEADER_SIZE = 30  # fixed part of a zip local file header
_PAD_EXTRA_HEADER_SIZE = 4  # id + length of the padding extra field
_ZIP64_EXTRA_SIZE = 20  # zipfile's zip64 local extra: id, length, two 64-bit sizes
_ZIP64_THRESHOLD = zipfile.ZIP64_LIMIT  # records larger than this need zip64 sizes
_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)  # fixed timestamp: same tensors -> same file bytes


def _p_global(module: str, name: str) -> bytes:
    return pickle.GLOBAL + f"{module}\n{name}\n".encode("ascii")


def _p_str(s: str) -> bytes:
    b = s.encode("utf-8")
    return pickle.BINUNICODE + struct.pack("<I", len(b)) + b


def _p_int(n: int) -> bytes:
    if 0 <= n < 1 << 8:
        return pickle.BININT1 + struct.pack("<B", n)
    if 0 <= n < 1 << 16:
        return pickle.BININT2 + struct.pack("<H", n)
    if -(1 << 31) <= n < 1 << 31:
        return pickle.BININT + struct.pack("<i", n)
    b = n.to_bytes(n.bit_length() // 8 + 1, "little", signed=True)
    return pickle.LONG1 + struct.pack("<B", len(b)) + b


def _p_tuple(items: list[bytes]) -> bytes:
    if not items:
        return pickle.EMPTY_TUPLE
    if len(items) <= 3:
        return b"".join(items) + (pickle.TUPLE1, pickle.TUPLE2, pickle.TUPLE3)[len(items) - 1]
    return pickle.MARK + b"".join(items) + pickle.TUPLE


_P_EMPTY_ORDERED_DICT = _p_global("collections", "OrderedDict") + pickle.EMPTY_TUPLE + pickle.REDUCE


def _contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    # torch's rule: size-0 dims count as 1, so torch.zeros(0, 4).stride() == (4, 1)
    strides, acc = [], 1
    for n in reversed(shape):
        strides.append(acc)
        acc *= max(n, 1)
    return tuple(reversed(strides))


def _p_tensor(key: str, storage_type: str, shape: tuple[int, ...], numel: int) -> bytes:
    """``_rebuild_tensor_v2(<storage>, 0, shape, strides, False, OrderedDict())``."""
    pid = _p_tuple(
        [_p_str("storage"), _p_global("torch", storage_type), _p_str(key), _p_str("cpu"), _p_int(numel)]
    )
    args = _p_tuple(
        [
            pid + pickle.BINPERSID,
            _p_int(0),
            _p_tuple([_p_int(n) for n in shape]),
            _p_tuple([_p_int(s) for s in _contiguous_strides(shape)]),
            pickle.NEWFALSE,
            _P_EMPTY_ORDERED_DICT,
        ]
    )
    return _p_global("torch._utils", "_rebuild_tensor_v2") + args + pickle.REDUCE


def _write_record(f: io.BufferedWriter, zf: zipfile.ZipFile, name: str, data: bytes | memoryview) -> None:
    """Add an uncompressed record whose data starts at a multiple of ``_ALIGNMENT``.

    Like torch's writer, the local header is padded with an extra field (id ``FB``,
    filled with ``Z``) so that the data lands on the alignment boundary.
    """
    zip64 = len(data) > _ZIP64_THRESHOLD
    # file_size stays 0 until written, so zipfile adds its zip64 extra iff forced.
    header_end = (
        f.tell()
        + _LOCAL_HEADER_SIZE
        + len(name.encode("utf-8"))
        + _PAD_EXTRA_HEADER_SIZE
        + (_ZIP64_EXTRA_SIZE if zip64 else 0)
    )
    pad = -header_end % _ALIGNMENT
    info = zipfile.ZipInfo(name, date_time=_ZIP_EPOCH)
    info.extra = b"FB" + struct.pack("<H", pad) + b"Z" * pad
    with zf.open(info, "w", force_zip64=zip64) as dest:
        if f.tell() % _ALIGNMENT:  # guards against zipfile changing its header layout
            raise PthError(f"internal error: record {name!r} would not be {_ALIGNMENT}-byte aligned")
        dest.write(data)


def write_pth(path: str | os.PathLike, tensors: Mapping[str, np.ndarray]) -> None:
    """Write a file that torch.load(path, weights_only=True) and torch.load(path) read back as a dict of tensors with the same names, dtypes, shapes and bytes.

    Values may be anything ``np.asarray`` accepts (numpy, JAX arrays, ...) with dtype
    float64, float32, float16, bfloat16 (``ml_dtypes``), int64, int32, int16, int8,
    uint8 or bool, of any rank including 0-d and empty. As with torch.save, record
    data is 64-byte aligned, so ``torch.load(path, mmap=True)`` maps aligned tensors.
    The file is byte-for-byte deterministic. Every tensor gets its own
    storage, so arrays that share memory are written (and read back) as copies.

    Raises:
        PthError: a key is not a string or an array has an unsupported dtype
            (checked before the file is created).
    """
    arrays: list[tuple[str, np.ndarray, str]] = []
    for name, value in tensors.items():
        if not isinstance(name, str):
            raise PthError(f"key {name!r} is not a string")
        arr = np.asarray(value)
        # Byte order is normalised below, so a big-endian input maps like a native one.
        storage_type = _DTYPE_STORAGES.get(arr.dtype.newbyteorder("<"))
        if storage_type is None:
            raise PthError(f"{name!r}: dtype {arr.dtype} has no torch storage type")
        arrays.append((name, arr, storage_type))

    pickled = [pickle.PROTO + b"\x02", _P_EMPTY_ORDERED_DICT, pickle.MARK]
    for key, (name, arr, storage_type) in enumerate(arrays):
        pickled.append(_p_str(name) + _p_tensor(str(key), storage_type, arr.shape, arr.size))
    pickled += [pickle.SETITEMS, pickle.STOP]

    with open(path, "wb") as f, zipfile.ZipFile(f, "w", zipfile.ZIP_STORED) as zf:
        _write_record(f, zf, _ARCHIVE_PREFIX + "data.pkl", b"".join(pickled))
        _write_record(f, zf, _ARCHIVE_PREFIX + "byteorder", b"little")
        for key, (_, arr, storage_type) in enumerate(arrays):
            data = np.asarray(arr, dtype=_STORAGE_DTYPES[storage_type], order="C")
            # A uint8 view has a buffer even for dtypes (bfloat16) memoryview rejects.
            _write_record(f, zf, f"{_ARCHIVE_PREFIX}data/{key}", memoryview(data.reshape(-1).view(np.uint8)))
        _write_record(f, zf, _ARCHIVE_PREFIX + "version", b"3\n")
