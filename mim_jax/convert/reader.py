"""Reading PyTorch checkpoints without PyTorch: `.pth` / `.pt` zip archives and `.safetensors`.

A checkpoint written by `torch.save` (PyTorch >= 1.6) is a zip archive holding
`<archive>/data.pkl` (a pickle of the saved object) and one file per tensor storage,
`<archive>/data/<key>` (raw little-endian bytes unless `<archive>/byteorder` says 'big').
Tensors appear in the pickle as calls of `torch._utils._rebuild_tensor_v2(storage, offset,
size, stride, ...)` whose `storage` is a persistent id ('storage', <storage type>, key,
location, numel). `read_torch_zip` unpickles data.pkl with an Unpickler that resolves only an
allow-list of globals (torch's rebuild functions, storage types and dtypes, OrderedDict, a
few harmless numpy / argparse reconstructors), each mapped to a numpy stand-in, so loading a
file never imports torch nor runs code the file names: anything else is refused with a
one-line error. Tensors come back as numpy arrays (bfloat16 through ml_dtypes), views honour
their storage offset and strides.
"""
from __future__ import annotations

import argparse
import collections
import io
import json
import os
import pickle
import struct
import zipfile
from typing import Any

import ml_dtypes
import numpy as np


class CheckpointReadError(ValueError):
  """A file that cannot be read as weights; the message says what to do instead."""


# torch storage class names and dtype names -> numpy dtypes.
_STORAGE_DTYPES = {
    "DoubleStorage": np.float64, "FloatStorage": np.float32, "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8,
    "BoolStorage": np.bool_, "UntypedStorage": np.uint8,
}
_TORCH_DTYPES = {
    "float64": np.float64, "double": np.float64, "float32": np.float32, "float": np.float32,
    "float16": np.float16, "half": np.float16, "bfloat16": ml_dtypes.bfloat16,
    "int64": np.int64, "long": np.int64, "int32": np.int32, "int": np.int32, "int16": np.int16,
    "short": np.int16, "int8": np.int8, "uint8": np.uint8, "bool": np.bool_,
}


class _StorageType:
  """What a storage class or dtype global (torch.FloatStorage, torch.float32) unpickles to."""

  def __init__(self, name: str, dtype):
    self.name, self.dtype = name, np.dtype(dtype)

  def __repr__(self):
    return f"torch.{self.name}"


def _rebuild_tensor(storage, offset, size, stride, *unused):
  """torch._utils._rebuild_tensor_v2: the view (offset, size, stride, in elements) of a
  storage, as a fresh contiguous numpy array."""
  if not isinstance(storage, np.ndarray):
    raise CheckpointReadError(f"a tensor refers to {type(storage).__name__}, not a storage: the "
                              f"file is not a plain torch.save checkpoint")
  size, stride, offset = tuple(int(s) for s in size), tuple(int(s) for s in stride), int(offset)
  if len(size) != len(stride):
    raise CheckpointReadError(f"a tensor has size {size} but stride {stride}")
  if 0 in size:
    return np.zeros(size, storage.dtype)
  last = offset + sum((n - 1) * s for n, s in zip(size, stride))
  if offset < 0 or min(stride, default=0) < 0 or last >= storage.size:
    raise CheckpointReadError(f"a tensor view (offset {offset}, size {size}, stride {stride}) "
                              f"lies outside its storage of {storage.size} elements: the file "
                              f"is damaged")
  item = storage.dtype.itemsize
  view = np.lib.stride_tricks.as_strided(storage[offset:], size, tuple(s * item for s in stride),
                                         writeable=False)
  return np.array(view)


def _rebuild_parameter(data, *unused):
  """torch._utils._rebuild_parameter(_with_state): a Parameter is its data here."""
  return data


def _codecs_encode(text, encoding="utf-8"):
  """_codecs.encode, which protocol-2 pickles use for bytes objects (latin-1 text)."""
  if not isinstance(text, str) or encoding.replace("-", "").lower() not in ("latin1", "utf8"):
    raise CheckpointReadError(f"refusing _codecs.encode({type(text).__name__}, {encoding!r})")
  return text.encode(encoding)


def _allowed_globals() -> dict:
  allowed = {
      ("collections", "OrderedDict"): collections.OrderedDict,
      ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
      ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
      ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
      ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
      ("_codecs", "encode"): _codecs_encode,
      ("argparse", "Namespace"): argparse.Namespace,     # training scripts save their args
      ("builtins", "set"): set,
      ("builtins", "frozenset"): frozenset,
      ("builtins", "slice"): slice,
      # numpy scalars / arrays in saved args or optimiser state (numpy's own reconstructors).
      ("numpy", "dtype"): np.dtype,
      ("numpy", "ndarray"): np.ndarray,
  }
  scalar = _np_scalar_fn()
  for core in ("numpy.core.multiarray", "numpy._core.multiarray"):
    allowed[(core, "scalar")] = scalar
    allowed[(core, "_reconstruct")] = _np_reconstruct
  for name, dtype in _STORAGE_DTYPES.items():
    allowed[("torch", name)] = _StorageType(name, dtype)
    allowed[("torch.storage", name)] = _StorageType(name, dtype)
  for name, dtype in _TORCH_DTYPES.items():
    allowed[("torch", name)] = _StorageType(name, dtype)
  return {k: v for k, v in allowed.items() if v is not None}


def _np_scalar_fn():
  """numpy's scalar reconstructor (numpy._core in numpy 2, numpy.core before)."""
  import importlib
  for name in ("numpy._core.multiarray", "numpy.core.multiarray"):
    try:
      return importlib.import_module(name).scalar
    except (ImportError, AttributeError):
      continue
  return None


def _np_reconstruct(subtype, shape, dtype):
  """numpy.core.multiarray._reconstruct, for plain ndarrays only."""
  if subtype is not np.ndarray:
    raise CheckpointReadError(f"refusing to rebuild a numpy {subtype!r}")
  return np.ndarray.__new__(np.ndarray, shape, dtype)


_ALLOWED = _allowed_globals()


class _RestrictedUnpickler(pickle.Unpickler):
  """Resolves only `_ALLOWED` globals; storages come from the archive's data/ files."""

  def __init__(self, file, load_storage):
    super().__init__(file)
    self._load_storage = load_storage

  def find_class(self, module, name):
    try:
      return _ALLOWED[(module, name)]
    except KeyError:
      raise CheckpointReadError(
          f"the checkpoint's pickle names {module}.{name}, which is not tensor data: refusing to "
          f"run it; save only the weights (torch.save(model.state_dict(), path)) or convert the "
          f"file to .safetensors") from None

  def persistent_load(self, pid):
    if not isinstance(pid, tuple) or len(pid) != 5 or pid[0] not in ("storage", b"storage"):
      raise CheckpointReadError(f"unknown persistent id {str(pid)[:80]} in the checkpoint's pickle")
    _, storage_type, key, _location, numel = pid
    if not isinstance(storage_type, _StorageType):
      raise CheckpointReadError(f"unknown storage type {storage_type!r} in the checkpoint's pickle")
    return self._load_storage(str(key), storage_type.dtype, int(numel))


def read_torch_zip(path: str) -> Any:
  """The object a `torch.save` zip archive holds, tensors as numpy arrays, without torch."""
  with open(path, "rb") as f:
    head = f.read(8)
  if not zipfile.is_zipfile(path):
    if head[:2] == b"\x80\x02":
      raise CheckpointReadError(
          f"{path} is in PyTorch's legacy (pre-1.6) format: re-save it with a recent torch "
          f"(torch.save(torch.load(path), new_path)) or convert it to .safetensors")
    raise CheckpointReadError(f"{path} is not a PyTorch zip checkpoint (.pth/.pt) nor .safetensors")
  with zipfile.ZipFile(path) as zf:
    names = zf.namelist()
    pkls = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
    if len(pkls) != 1:
      hint = " (a TorchScript archive: save model.state_dict() instead)" if any(
          n.endswith("/constants.pkl") for n in names) else ""
      raise CheckpointReadError(f"{path} has {len(pkls)} data.pkl entries, expected 1{hint}")
    root = pkls[0][: -len("data.pkl")]
    order = "little"
    if root + "byteorder" in names:
      order = zf.read(root + "byteorder").decode().strip()
    cache: dict = {}

    def load_storage(key, dtype, numel):
      if key not in cache:
        entry = f"{root}data/{key}"
        if entry not in names:
          raise CheckpointReadError(f"{path} lacks the storage file {entry}: the file is damaged")
        raw = zf.read(entry)
        dt = dtype.newbyteorder(">" if order == "big" else "<") if dtype.itemsize > 1 else dtype
        if len(raw) < numel * dtype.itemsize:
          raise CheckpointReadError(f"{entry} holds {len(raw)} bytes, fewer than {numel} x "
                                    f"{dtype.itemsize}: the file is damaged")
        cache[key] = np.frombuffer(raw, dt, count=len(raw) // dtype.itemsize).astype(dtype)
      arr = cache[key]
      return arr if arr.dtype == dtype else arr.view(dtype)

    try:
      return _RestrictedUnpickler(io.BytesIO(zf.read(pkls[0])), load_storage).load()
    except CheckpointReadError:
      raise
    except (pickle.UnpicklingError, EOFError, TypeError, AttributeError, ValueError) as e:
      raise CheckpointReadError(f"{path}: cannot unpickle its data.pkl ({type(e).__name__}: "
                                f"{str(e)[:120]}); re-save the state_dict or use "
                                f".safetensors") from None


# safetensors dtype names -> numpy (BF16 through ml_dtypes, which safetensors.numpy lacks).
_ST_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
              "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
              "BOOL": np.bool_}


def read_safetensors(path: str) -> dict:
  """{name: numpy array} of a .safetensors file (safetensors.numpy; BF16 read directly)."""
  import safetensors.numpy
  try:
    return dict(safetensors.numpy.load_file(path))
  except Exception as first:  # noqa: BLE001 - BF16 (no numpy dtype) lands here; parse by hand
    with open(path, "rb") as f:
      raw = f.read()
    try:
      (n,) = struct.unpack("<Q", raw[:8])
      header = json.loads(raw[8:8 + n])
    except (struct.error, ValueError):
      raise CheckpointReadError(f"{path} is not a .safetensors file ({first})") from None
    out = {}
    for name, info in header.items():
      if name == "__metadata__":
        continue
      if info["dtype"] not in _ST_DTYPES:
        raise CheckpointReadError(f"{path}: tensor {name} has dtype {info['dtype']}, which mim_jax "
                                  f"does not read; save it as float32")
      begin, end = info["data_offsets"]
      out[name] = np.frombuffer(raw[8 + n + begin: 8 + n + end], _ST_DTYPES[info["dtype"]]).reshape(
          info["shape"]).copy()
    return out


def read_checkpoint(path: str, reader: str = "pure") -> Any:
  """The object in `path`: .safetensors -> {name: array}; .pth / .pt / .bin -> what torch.save
  wrote, tensors as numpy. `reader='torch'` loads through torch.load(weights_only=True)."""
  if not os.path.isfile(path):
    raise CheckpointReadError(f"{path} does not exist: give the checkpoint file to convert")
  if path.endswith(".safetensors"):
    return read_safetensors(path)
  if reader == "torch":
    try:
      import torch
    except ImportError:
      raise CheckpointReadError("--reader=torch needs torch installed: use --reader=pure") from None
    obj = torch.load(path, map_location="cpu", weights_only=True)

    def to_np(x):
      if isinstance(x, torch.Tensor):
        x = x.detach()
        if x.dtype == torch.bfloat16:
          return x.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        return x.numpy().copy()
      if isinstance(x, dict):
        return {k: to_np(v) for k, v in x.items()}
      if isinstance(x, (list, tuple)):
        return type(x)(to_np(v) for v in x)
      return x
    return to_np(obj)
  if reader != "pure":
    raise CheckpointReadError(f"--reader={reader!r}: use 'pure' (default) or 'torch'")
  return read_torch_zip(path)
