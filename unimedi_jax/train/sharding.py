"""Device mesh and sharding rules: one jitted step, data parallel with optional FSDP.

The mesh comes from `config.mesh`, a list of (axis name, size) with at most one size -1 (all
remaining devices), axes "data" and optionally "fsdp". The batch is split over both axes;
parameters and optimiser state are replicated over "data" and, where a parameter is large enough,
split over "fsdp" along its largest divisible dimension (big_vision's fsdp rule).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax
from absl import logging
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from unimedi_jax.models.layers import BATCH_AXES

FSDP_MIN_SIZE = 2 ** 14  # smaller leaves stay replicated: splitting them costs more than it saves


def make_mesh(spec: Sequence[Sequence[Any]], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Builds a Mesh from [(axis, size), ...]; a size of -1 takes the remaining devices.

    Without -1 the mesh may use fewer devices than there are (the first ones), e.g. one device
    of eight to compare against a data-parallel run.
    """
    devices = list(jax.devices() if devices is None else devices)
    names = [str(name) for name, _ in spec]
    unknown = set(names) - set(BATCH_AXES)
    if unknown:
        raise ValueError(f"config.mesh names unknown axes {sorted(unknown)}; use {BATCH_AXES}")
    sizes = [int(size) for _, size in spec]
    if sizes.count(-1) > 1:
        raise ValueError(f"config.mesh={list(spec)}: at most one axis may have size -1")
    fixed = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if len(devices) % fixed:
            raise ValueError(f"config.mesh={list(spec)}: {len(devices)} devices are not divisible"
                             f" by the fixed axis sizes ({fixed})")
        sizes[sizes.index(-1)] = len(devices) // fixed
    if math.prod(sizes) > len(devices) or (-1 in [int(s) for _, s in spec]
                                            and math.prod(sizes) != len(devices)):
        raise ValueError(f"config.mesh={list(spec)} needs {math.prod(sizes)} devices, "
                         f"{len(devices)} are available")
    devices = devices[:math.prod(sizes)]
    for axis in BATCH_AXES:  # both axes always exist, so specs can name them
        if axis not in names:
            names.append(axis)
            sizes.append(1)
    return Mesh(np.asarray(devices).reshape(sizes), tuple(names))


def data_parallel_size(mesh: Mesh) -> int:
    return math.prod(mesh.shape[a] for a in BATCH_AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over data and fsdp."""
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def param_spec(shape: Sequence[int], fsdp: int) -> P:
    """Splits the largest dimension divisible by the fsdp size, for leaves worth splitting."""
    if fsdp == 1 or math.prod(shape) < FSDP_MIN_SIZE:
        return P()
    for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
        if shape[dim] % fsdp == 0:
            spec = [None] * len(shape)
            spec[dim] = "fsdp"
            return P(*spec)
    return P()


def state_shardings(mesh: Mesh, abstract_state: Any) -> Any:
    """NamedShardings for every leaf of a (abstract) state pytree."""
    fsdp = mesh.shape["fsdp"]
    return jax.tree.map(lambda x: NamedSharding(mesh, param_spec(np.shape(x), fsdp)),
                        abstract_state)


def put_batch(batch: Any, mesh: Mesh) -> Any:
    """Host-local numpy batch -> global arrays split over the batch axes (multi-process safe)."""
    sharding = batch_sharding(mesh)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), batch)


def put_global(batch: Any, mesh: Mesh) -> Any:
    """A global numpy batch that every process holds whole (an evaluation batch) -> global
    arrays split over the batch axes; each process places the rows of its own devices."""
    sharding, size = batch_sharding(mesh), data_parallel_size(mesh)
    rows = {np.shape(x)[0] for x in jax.tree.leaves(batch)}
    if any(n % size for n in rows):
        raise ValueError(f"A batch of {sorted(rows)} rows does not split over the {size} devices "
                         f"of the mesh's batch axes {BATCH_AXES}: use a multiple of {size}")
    return jax.tree.map(
        lambda x: jax.make_array_from_callback(np.shape(x), sharding, lambda index: x[index]),
        batch)


def to_host(tree: Any) -> Any:
    """Device arrays -> numpy on every process: replicated leaves from a local copy (no
    collective), sharded leaves gathered across processes."""
    def get(x):
        if jax.process_count() == 1 or not isinstance(x, jax.Array):
            return np.asarray(jax.device_get(x))
        if x.is_fully_replicated:
            return np.asarray(x.addressable_data(0))
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return jax.tree.map(get, tree)


def compile_cpu_collectives_afresh():
    """Turns the persistent compilation cache off when CPU programs have collectives (more than
    one device, simulated or in other processes); call before anything is compiled.

    An XLA:CPU executable loaded from that cache loses the ordering between the collectives
    inside a nested computation (a conditional's branch, a scanned layer's loop body) and the
    main sequence's collectives, so devices may start them in different orders and deadlock
    (gloo across processes, the in-process rendezvous across simulated devices). Compiled
    afresh, all collectives run in program order. The data-parallel train step keeps every
    collective in its main sequence (the scaling benchmark's test checks this with
    `benchmarks.common.hlo_nested_collectives`); scanned or FSDP-split steps may not, and
    this guards them. The cache decides once per process whether it
    is used, so this must run before the first compilation.
    """
    if (jax.default_backend() == "cpu" and jax.device_count() > 1
            and jax.config.jax_enable_compilation_cache):
        jax.config.update("jax_enable_compilation_cache", False)
        logging.info("CPU run on %d devices: persistent compilation cache off",
                     jax.device_count())
