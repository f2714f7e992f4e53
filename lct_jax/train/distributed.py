"""Start the JAX distributed runtime for ``python -m lct_jax.train``: explicit settings, or JAX's cluster detection.

Every process of a multi-host run executes the same command; :func:`start` connects them before anything touches a
device. Two ways in:

- **Explicit** (a plain set of hosts, a test on one machine, any scheduler JAX does not know): the coordinator
  ``HOST:PORT`` (process 0's address; it listens there), the process count and this process's id, from flags or
  environment variables (a flag wins over its variables, the first variable set wins over the later ones)::

      --coordinator_address       LCT_COORDINATOR_ADDRESS, JAX_COORDINATOR_ADDRESS
      --num_processes             LCT_NUM_PROCESSES
      --process_id                LCT_PROCESS_ID
      --coordinator_bind_address  LCT_COORDINATOR_BIND_ADDRESS, JAX_COORDINATOR_BIND_ADDRESS
      --local_device_ids          LCT_LOCAL_DEVICE_IDS, JAX_LOCAL_DEVICE_IDS    (e.g. 0,1,2,3)

  Whatever is left unset is filled in by JAX's cluster detection, as ``jax.distributed.initialize`` does; if no
  cluster is detected, a missing setting is an error naming it. With all three given, nothing is detected.
- **Auto** (``--distributed=auto``, the default, with none of the three set): ask JAX's own cluster detection
  (``jax._src.clusters.ClusterEnv``, the code ``jax.distributed.initialize()`` runs) whether this process is part
  of a cluster: a Cloud TPU VM slice (``GceTpuCluster``: the worker list from the VM metadata server), GKE TPU pods
  (``GkeTpuCluster``: ``TPU_WORKER_HOSTNAMES``/``TPU_PROCESS_ADDRESSES``), SLURM (``SLURM_*`` of an ``srun`` step),
  Open MPI (``OMPI_MCA_orte_hnp_uri``), Kubernetes indexed Jobs (``KUBERNETES_SERVICE_HOST`` + the ``kubernetes``
  package). A cluster of more than one process → ``jax.distributed.initialize()``; none, or one process → run
  alone. ``--distributed=yes`` requires a cluster (or explicit settings); ``--distributed=no`` never connects.

Never hangs: on a plain host detection reads environment variables only (the TPU probes run only where JAX found
TPU chips on the PCI bus, ``running_in_cloud_tpu_vm``; there JAX asks the metadata server with a 60 s timeout per
try, 6 tries), and detection, reaching the coordinator and connecting are each bounded by ``timeout_s``. JAX's
client aborts the process (SIGABRT, a C++ stack) when it cannot connect, so the two failures a user causes most,
process 0 unable to listen on its port and a coordinator nobody can reach, are checked first and reported as one
line; a process that never arrives still ends every other process after ``timeout_s`` with JAX's own message.
Where collectives bind is the platform's business: TPU slices talk over ICI and, across slices, over DCN as
``MEGASCALE_*`` (set by queued resources / GKE) says; GPUs follow ``NCCL_SOCKET_IFNAME``; the CPU backend's gloo
collectives use the address the host name resolves to (jax 0.10.2 has no knob for it).

Every setting a user can get wrong raises :class:`DistributedError`, one line naming the setting and the fix.
"""

from __future__ import annotations

import dataclasses
import os
import re
import socket
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax

# private, but exactly what jax.distributed.initialize() consults; jax is pinned (pyproject.toml)
from jax._src import clusters as jax_clusters

from lct_jax.errors import UserError

MODES = ("auto", "yes", "no")

# setting -> environment variables read when its flag is not given, first set wins
ENV_VARS: dict[str, tuple[str, ...]] = {
    "coordinator_address": ("LCT_COORDINATOR_ADDRESS", "JAX_COORDINATOR_ADDRESS"),
    "num_processes": ("LCT_NUM_PROCESSES",),
    "process_id": ("LCT_PROCESS_ID",),
    "coordinator_bind_address": ("LCT_COORDINATOR_BIND_ADDRESS", "JAX_COORDINATOR_BIND_ADDRESS"),
    "local_device_ids": ("LCT_LOCAL_DEVICE_IDS", "JAX_LOCAL_DEVICE_IDS"),
}
REQUIRED = ("coordinator_address", "num_processes", "process_id")
TIMEOUT_S = 300.0

_HELP = {
    "distributed": "connect the processes of a multi-host run (lct_jax/train/distributed.py): auto = when JAX "
    "detects a cluster (Cloud TPU VM slice, GKE, SLURM, Open MPI, Kubernetes) or the settings below are given; "
    "yes = must; no = never",
    "coordinator_address": "HOST:PORT of process 0",
    "num_processes": "processes in the run",
    "process_id": "this process, 0..num_processes-1",
    "coordinator_bind_address": "where process 0 listens (default [::]:PORT)",
    "local_device_ids": "devices this process uses, e.g. 0,1",
    "distributed_timeout": "seconds allowed for cluster detection and for all processes to connect",
}
# the flags of every entry point that computes (absl in lct_jax.train, argparse in lct_jax.eval), name -> help:
# --distributed is one of MODES, --distributed_timeout seconds, the others strings that settings() validates
FLAG_HELP: dict[str, str] = {
    k: h + (f" (env {', '.join(ENV_VARS[k])})" if k in ENV_VARS else "") for k, h in _HELP.items()
}
_ADDRESS = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.\-]+):(\d+)$")  # host:port, [ipv6]:port


class DistributedError(UserError, ValueError):
    """A distributed setting that is wrong or missing, or a runtime that would not start (one line)."""


@dataclasses.dataclass(frozen=True)
class Settings:
    """The explicit settings, each with where it came from (``--flag`` or an environment variable)."""

    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    coordinator_bind_address: str | None = None
    local_device_ids: tuple[int, ...] | None = None
    sources: Mapping[str, str] = dataclasses.field(default_factory=dict)

    @property
    def explicit(self) -> bool:
        return any(getattr(self, k) is not None for k in REQUIRED)

    def name(self, key: str) -> str:
        return f"{self.sources[key]}" if key in self.sources else f"--{key}"


@dataclasses.dataclass(frozen=True)
class Cluster:
    """What JAX's detection found: the ``ClusterEnv`` subclass name (e.g. ``SlurmCluster``) and its size."""

    name: str
    num_processes: int


def _address(value: str, src: str) -> str:
    if not _ADDRESS.match(value) or not 0 < int(value.rsplit(":", 1)[1]) < 65536:
        raise DistributedError(
            f"{src}={value!r} is not HOST:PORT with a port in 1..65535 (e.g. 10.0.0.2:8476 or [::1]:8476)"
        )
    return value


def _int(value: Any, src: str, low: int) -> int:
    text = str(value).strip()
    if not re.fullmatch(r"-?\d+", text) or int(text) < low:
        raise DistributedError(f"{src}={value!r} must be an integer >= {low}")
    return int(text)


def _ids(value: str | Sequence[str], src: str) -> tuple[int, ...]:
    parts = value.split(",") if isinstance(value, str) else list(value)
    ids = tuple(_int(p, src, 0) for p in parts if str(p).strip())
    if not ids:
        raise DistributedError(f"{src}={value!r} names no device id; give e.g. 0,1,2,3")
    return ids


_PARSE: dict[str, Callable[[Any, str], Any]] = {
    "coordinator_address": _address,
    "num_processes": lambda v, s: _int(v, s, 1),
    "process_id": lambda v, s: _int(v, s, 0),
    "coordinator_bind_address": _address,
    "local_device_ids": _ids,
}


def settings(flag_values: Mapping[str, Any], environ: Mapping[str, str] | None = None) -> Settings:
    """Merge flag values (``None`` = not given) over :data:`ENV_VARS`; validate each; return :class:`Settings`."""
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for key, variables in ENV_VARS.items():
        raw, src = flag_values.get(key), f"--{key}"
        if raw is None:
            src = next((v for v in variables if environ.get(v, "").strip()), "")
            raw = environ[src].strip() if src else None
        if raw is not None:
            values[key], sources[key] = _PARSE[key](raw, src), src
    s = Settings(**values, sources=sources)
    if s.num_processes is not None and s.process_id is not None and s.process_id >= s.num_processes:
        raise DistributedError(
            f"{s.name('process_id')}={s.process_id} must be below {s.name('num_processes')}={s.num_processes} "
            f"(ids run 0..{s.num_processes - 1}, one per process)"
        )
    return s


def _bounded(fn: Callable[[], Any], timeout_s: float, what: str):
    """``fn()`` in a daemon thread, at most ``timeout_s`` seconds; its exception is re-raised here."""
    out: dict[str, Any] = {}

    def target():
        try:
            out["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the caller below
            out["error"] = e

    t = threading.Thread(target=target, name=what, daemon=True)
    t.start()
    t.join(timeout_s)
    if t.is_alive():
        raise DistributedError(
            f"{what} did not finish within {timeout_s:g} s (a metadata server or cluster API that does not "
            "answer?); give --coordinator_address/--num_processes/--process_id, or --distributed=no to run alone"
        )
    if "error" in out:
        e = out["error"]
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DistributedError(f"{what} failed: {type(e).__name__}: {first}") from e
    return out.get("value")


def detect_cluster(timeout_s: float = 60) -> Cluster | None:
    """The cluster JAX's ``jax.distributed.initialize()`` would detect here (same environments, same order,
    opt-in-only ones such as mpi4py skipped), or ``None``; bounded by ``timeout_s``."""

    def probe():
        for env in jax_clusters.ClusterEnv._cluster_types:
            if not env.opt_in_only_method and env.is_env_present():
                return Cluster(env.__name__, int(env.get_process_count()))
        return None

    return _bounded(probe, timeout_s, "cluster detection")


def start(mode: str, s: Settings, timeout_s: float = TIMEOUT_S) -> str:
    """Connect this process to the others (or decide to run alone); returns one line saying which.

    Must run before anything initializes a JAX backend (``jax.devices()``, the first computation).
    """
    if mode not in MODES:
        raise DistributedError(f"--distributed={mode!r} must be one of {'|'.join(MODES)}")
    if timeout_s <= 0:
        raise DistributedError(f"--distributed_timeout={timeout_s} must be > 0 seconds")
    if mode == "no":
        if s.explicit:
            given = ", ".join(s.name(k) for k in REQUIRED if getattr(s, k) is not None)
            raise DistributedError(f"--distributed=no contradicts {given}; drop one of them")
        return "single process (--distributed=no)"
    cluster = None
    missing = [k for k in REQUIRED if getattr(s, k) is None]
    if missing:
        cluster = detect_cluster(timeout_s)
        if cluster is None:
            if mode == "auto" and not s.explicit:
                return "single process (no cluster detected)"
            names = ", ".join(f"--{k} ({'/'.join(ENV_VARS[k])})" for k in missing)
            raise DistributedError(
                f"{names} not set and no cluster environment detected (JAX knows Cloud TPU VMs, GKE, SLURM, Open "
                "MPI, Kubernetes); give them on every process, e.g. --coordinator_address=HOST0:8476 "
                "--num_processes=N --process_id=I"
            )
        if mode == "auto" and not s.explicit and cluster.num_processes == 1:
            return f"single process ({cluster.name} reports one process)"
    addr, n, pid, local = s.coordinator_address, s.num_processes, s.process_id, s.local_device_ids
    if missing:  # the rest from the cluster, exactly as jax.distributed.initialize() would fill it in
        addr, n, pid, local = _bounded(
            lambda: jax_clusters.ClusterEnv.auto_detect_unset_distributed_params(
                addr, n, pid, list(local) if local is not None else None, None, int(timeout_s)
            ),
            timeout_s,
            f"reading the {cluster.name} settings",
        )
        if None in (addr, n, pid) or not 0 <= pid < n:
            raise DistributedError(
                f"{cluster.name} gave coordinator={addr} num_processes={n} process_id={pid}; give the missing or "
                "wrong ones explicitly (--coordinator_address/--num_processes/--process_id)"
            )
        _address(addr, f"the {cluster.name} coordinator address")
    _preflight(addr, pid, s.coordinator_bind_address, timeout_s)
    print(f"jax.distributed: process {pid} of {n} connecting to {addr} (up to {timeout_s:g} s)", flush=True)
    try:
        jax.distributed.initialize(
            coordinator_address=addr,
            num_processes=n,
            process_id=pid,
            local_device_ids=list(local) if local is not None else None,
            cluster_detection_method="deactivate",  # resolved above
            initialization_timeout=int(max(1, timeout_s)),
            coordinator_bind_address=s.coordinator_bind_address,
        )
    except Exception as e:  # noqa: BLE001 - XlaRuntimeError has no narrower public type
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DistributedError(
            f"the JAX distributed runtime did not start ({type(e).__name__}: {first}); check that every process "
            f"runs with coordinator {addr} and {n} processes, each process id once"
        ) from e
    via = cluster.name if missing else "explicit settings"
    return f"jax.distributed via {via}: process {pid} of {n}, coordinator {addr}"


def _host_port(address: str) -> tuple[str, int]:
    host, port = address.rsplit(":", 1)
    return host.strip("[]"), int(port)


def _preflight(addr: str, pid: int, bind: str | None, timeout_s: float) -> None:
    """The failures JAX's client turns into a process abort (SIGABRT and a C++ stack), caught first as one line:
    process 0 cannot listen on its port; another process cannot reach the coordinator within ``timeout_s``.
    (A process that never arrives is left to JAX: every other process stops after ``timeout_s`` with its message.)
    """
    if pid == 0:
        host, port = _host_port(bind) if bind else ("::", _host_port(addr)[1])  # JAX's default: [::]:PORT
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        if family == socket.AF_INET6 and not socket.has_ipv6 and not bind:
            family, host = socket.AF_INET, "0.0.0.0"
        try:
            with socket.socket(family, socket.SOCK_STREAM) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC does: TIME_WAIT is fine
                probe.bind((host, port))
        except OSError as e:
            raise DistributedError(
                f"process 0 cannot listen on {bind or f'[::]:{port}'} ({e.strerror}): the port is taken (another "
                "run's coordinator?) or the address is not this host's; pick a free port / the right address"
            ) from e
        return
    host, port = _host_port(addr)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            socket.create_connection(
                (host, port), timeout=min(5.0, max(0.1, deadline - time.monotonic()))
            ).close()
            return
        except OSError as e:
            if time.monotonic() >= deadline:
                raise DistributedError(
                    f"the coordinator {addr} did not accept a connection within {timeout_s:g} s ({e}); start process "
                    "0 with the same --coordinator_address, and check the host, the port and the firewall"
                ) from e
            time.sleep(0.5)
