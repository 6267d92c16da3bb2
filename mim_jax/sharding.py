"""Meshes, parameter shardings and host-to-device batches: sharding is data, not code.

`config.mesh` lists (axis name, size) pairs, one size may be -1 for "all remaining devices":
    config.mesh = (('data', -1), ('fsdp', 1))
`config.sharding_rules` lists (regex, strategy) pairs matched in order against each parameter's
path ('encoder/encoder/block00/attn/qkv_kernel'); the first match wins:
    'replicate'  the parameter lives whole on every device;
    'fsdp'       its largest dimension divisible by the 'fsdp' axis is split over that axis.
The batch is split over every mesh axis (data parallel x fsdp), as in big_vision.
"""
from __future__ import annotations

import re
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

PyTree = Any


class ShardingError(ValueError):
  pass


def make_mesh(mesh_cfg: Sequence, devices: Sequence[jax.Device] | None = None) -> Mesh:
  devices = list(devices if devices is not None else jax.devices())
  names = [str(n) for n, _ in mesh_cfg]
  sizes = [int(s) for _, s in mesh_cfg]
  if sizes.count(-1) > 1:
    raise ShardingError(f"config.mesh {tuple(mesh_cfg)} has more than one -1: give all but one axis a size")
  known = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    if len(devices) % known:
      raise ShardingError(f"config.mesh {tuple(mesh_cfg)} does not divide the {len(devices)} devices: "
                          f"make the fixed axis sizes divide {len(devices)}")
    sizes[sizes.index(-1)] = len(devices) // known
  if int(np.prod(sizes)) != len(devices):
    raise ShardingError(f"config.mesh {tuple(mesh_cfg)} needs {int(np.prod(sizes))} devices but "
                        f"{len(devices)} are present: set one axis to -1 or fix the sizes")
  return Mesh(np.asarray(devices).reshape(sizes), names)


def batch_axes(mesh: Mesh) -> tuple[str, ...]:
  return tuple(mesh.axis_names)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(batch_axes(mesh)))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def check_batch(global_batch: int, mesh: Mesh, what: str = "config.input.batch_size") -> None:
  n = mesh.devices.size
  if global_batch % n:
    raise ShardingError(f"{what}={global_batch} is not divisible by the {n} devices: "
                        f"use a multiple of {n}")
  if global_batch % jax.process_count():
    raise ShardingError(f"{what}={global_batch} is not divisible by the {jax.process_count()} "
                        f"processes: use a multiple of {jax.process_count()}")


def path_str(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def fsdp_spec(shape: tuple[int, ...], axis_size: int, axis: str = "fsdp") -> P:
  """Shard the largest dimension that the axis divides; replicate if none does."""
  if axis_size <= 1:
    return P()
  order = sorted(range(len(shape)), key=lambda i: -shape[i])
  for i in order:
    if shape[i] % axis_size == 0 and shape[i] >= axis_size:
      spec = [None] * len(shape)
      spec[i] = axis
      return P(*spec)
  return P()


def tree_shardings(mesh: Mesh, tree: PyTree, rules: Sequence[tuple[str, str]]) -> PyTree:
  """NamedShardings for a pytree of arrays / ShapeDtypeStructs from regex rules."""
  compiled = [(re.compile(r), s) for r, s in rules]
  fsdp_size = dict(zip(mesh.axis_names, mesh.devices.shape)).get("fsdp", 1)

  def one(path, leaf):
    name = path_str(path)
    shape = tuple(getattr(leaf, "shape", ()))
    for rx, strategy in compiled:
      if rx.search(name):
        break
    else:
      strategy = "replicate"
    if strategy == "replicate" or not shape:
      return NamedSharding(mesh, P())
    if strategy == "fsdp":
      return NamedSharding(mesh, fsdp_spec(shape, fsdp_size))
    raise ShardingError(f"unknown sharding strategy {strategy!r} for {name}: use 'replicate' or 'fsdp'")

  return jax.tree_util.tree_map_with_path(one, tree)


def host_to_global(batch: dict, sharding: NamedSharding) -> dict:
  """This process's slice of the batch -> one global jax.Array per entry."""
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), batch)
