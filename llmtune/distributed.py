"""Training across processes and machines: agreement before anything heavy starts, and errors that name
the node and the setting instead of hanging.

Two layers:

- `handshake(node, recipe, timeout)` runs in every node's `llmtune train --nnodes N` before accelerate
  starts. Node 0 serves a TCPStore on --master-addr:--master-port; each node posts what it is about to
  run (node rank, node count, processes per node, the resolved recipe, library versions) and compares it
  with node 0's. An unreachable master, nodes that never join, a mismatched world size or different
  recipes end within `timeout` seconds on every node that can tell. The port is free again before
  accelerate's own rendezvous uses it.
- `RankGroup`, inside each training process whatever launched it (llmtune, accelerate, torchrun,
  SLURM): gathers small facts from every rank over the process group (gloo) so that all ranks check
  the same recipe, the same prepared data and the same checkpoint, plan for the same memory, and end
  with the same adapter.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from typing import Any

from llmtune.errors import LlmtuneError

LIBRARIES = ("llmtune", "torch", "transformers", "trl", "peft", "accelerate")
HANDSHAKE_PREFIX = "llmtune/handshake/"


def local_world_size() -> int:
    """Processes launched together on this machine (LOCAL_WORLD_SIZE under torchrun / accelerate)."""
    return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def fsdp_enabled() -> bool:
    """Whether accelerate launched this process with FSDP."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def configure_threads(num_threads: int | None = None) -> int:
    """torch threads for this process: every core it may use unless told otherwise (accelerate's
    launcher and some environments pin OMP_NUM_THREADS=1). Ranks launched together on one machine
    share its cores."""
    import torch

    n = num_threads or max(1, len(os.sched_getaffinity(0)) // local_world_size())
    torch.set_num_threads(n)
    return n


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now (for a rendezvous or a loopback server)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class DistributedError(LlmtuneError, RuntimeError):
    """Nodes or ranks that cannot train together: unreachable, missing, or disagreeing."""


# ---------------------------------------------------------------------------------------------
# What a node or rank runs, as comparable data


def flatten(doc: Any, prefix: str = "") -> dict[str, Any]:
    """{"training.max_steps": 4, "data.sources.0.path": ...}: a recipe as key -> value."""
    if isinstance(doc, dict):
        out: dict[str, Any] = {}
        for key, value in doc.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out or {prefix.rstrip("."): {}}
    if isinstance(doc, list):
        out = {}
        for i, value in enumerate(doc):
            out.update(flatten(value, f"{prefix}{i}."))
        return out or {prefix.rstrip("."): []}
    return {prefix.rstrip("."): doc}


def recipe_settings(recipe) -> dict[str, Any]:
    """The fully resolved recipe (defaults and overrides applied), flattened."""
    return flatten(recipe.model_dump(mode="json"))


def fingerprint(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def setting_differences(other: dict[str, Any], reference: dict[str, Any], other_name: str, reference_name: str,
                        limit: int = 5) -> str:
    """`lora.rank is 4 on node 1, 8 on node 0; ...`: the settings where two flattened recipes differ."""
    keys = sorted(k for k in other.keys() | reference.keys() if other.get(k, "<unset>") != reference.get(k, "<unset>"))
    lines = [f"{k} is {other.get(k, '<unset>')!r} on {other_name}, {reference.get(k, '<unset>')!r} on {reference_name}"
             for k in keys[:limit]]
    return "; ".join(lines + ([f"and {len(keys) - limit} more"] if len(keys) > limit else []))


def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in LIBRARIES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


# ---------------------------------------------------------------------------------------------
# Before launch: the node handshake


@dataclass(frozen=True)
class NodeSpec:
    """One machine's part in a run: --nnodes, --node-rank, --master-addr, --master-port, --nproc."""

    nnodes: int
    node_rank: int
    master_addr: str
    master_port: int
    nproc: int

    def validate(self) -> None:
        if self.nnodes < 1:
            raise DistributedError(f"--nnodes must be at least 1 (got {self.nnodes})")
        if not 0 <= self.node_rank < self.nnodes:
            raise DistributedError(f"--node-rank {self.node_rank} is outside 0..{self.nnodes - 1} (--nnodes {self.nnodes})")
        if self.nnodes > 1 and not self.master_addr:
            raise DistributedError("--nnodes > 1 needs --master-addr: the address of node 0, reachable from every node")
        if not 0 < self.master_port < 65536:
            raise DistributedError(f"--master-port {self.master_port} is not a TCP port")
        if self.nproc < 1:
            raise DistributedError(f"--nproc must be at least 1 (got {self.nproc})")


@dataclass
class NodeInfo:
    node_rank: int
    nnodes: int
    nproc: int
    host: str
    recipe: str  # fingerprint of the resolved recipe
    settings: dict[str, Any]
    versions: dict[str, str]
    accelerate_config: str | None = None

    @property
    def name(self) -> str:
        return f"node {self.node_rank} ({self.host})"

    @classmethod
    def parse(cls, raw: bytes) -> NodeInfo:
        doc = json.loads(raw)
        known = {k: doc.get(k) for k in cls.__dataclass_fields__}  # tolerate another llmtune version's fields
        known["settings"], known["versions"] = known["settings"] or {}, known["versions"] or {}
        return cls(**known)


def node_info(node: NodeSpec, recipe, accelerate_config: str | None) -> NodeInfo:
    settings = recipe_settings(recipe)
    return NodeInfo(node.node_rank, node.nnodes, node.nproc, socket.gethostname(), fingerprint(settings), settings,
                    library_versions(), accelerate_config)


def disagreements(reference: NodeInfo, other: NodeInfo) -> list[str]:
    """What `other` does differently from `reference` (node 0), each naming the setting."""
    problems = []
    if other.nnodes != reference.nnodes:
        problems.append(f"--nnodes is {other.nnodes} on {other.name} but {reference.nnodes} on {reference.name} "
                        f"(world size {other.nnodes * other.nproc} vs {reference.nnodes * reference.nproc})")
    if other.nproc != reference.nproc:
        problems.append(f"--nproc is {other.nproc} on {other.name} but {reference.nproc} on {reference.name} "
                        f"(world size {other.nnodes * other.nproc} vs {reference.nnodes * reference.nproc})")
    if other.accelerate_config != reference.accelerate_config:
        problems.append(f"--accelerate-config is {other.accelerate_config} on {other.name} but "
                        f"{reference.accelerate_config} on {reference.name}")
    if other.recipe != reference.recipe:
        diff = setting_differences(other.settings, reference.settings, f"node {other.node_rank}",
                                   f"node {reference.node_rank}")
        problems.append(f"{other.name} runs a different recipe than {reference.name}: {diff}; give every node "
                        f"the same recipe file and overrides")
    for lib, ver in reference.versions.items():
        if other.versions.get(lib) != ver:
            problems.append(f"{lib} is {other.versions.get(lib)} on {other.name} but {ver} on {reference.name}")
    return problems


def _open_store(node: NodeSpec, timeout: float):
    from torch.distributed import DistError, TCPStore

    where = f"--master-addr {node.master_addr} --master-port {node.master_port}"
    try:
        if node.node_rank == 0:
            return TCPStore(node.master_addr, node.master_port, is_master=True, wait_for_workers=False,
                            timeout=timedelta(seconds=timeout))
        return TCPStore(node.master_addr, node.master_port, is_master=False, timeout=timedelta(seconds=timeout))
    except DistError as exc:
        if node.node_rank == 0:
            raise DistributedError(f"node 0 ({socket.gethostname()}) cannot listen on port {node.master_port} "
                                   f"(--master-port): {str(exc).splitlines()[0]}; pick a free port") from None
        raise DistributedError(
            f"node {node.node_rank} ({socket.gethostname()}) cannot reach the master at {node.master_addr}:"
            f"{node.master_port} ({where}) within {timeout:g} s (--rdzv-timeout): start node 0 first or "
            f"together, and check the address and that the port is open between the machines") from None


def _wait(store, keys: list[str], deadline: float) -> list[str]:
    """Wait until `keys` exist or the deadline passes; returns the ones still missing."""
    from torch.distributed import DistError

    while True:
        missing = [k for k in keys if not store.check([k])]
        left = deadline - time.monotonic()
        if not missing or left <= 0:
            return missing
        try:
            store.wait(missing, timedelta(seconds=min(left, 1.0)))
        except DistError:
            pass


def handshake(node: NodeSpec, recipe, *, accelerate_config: str | None = None, timeout: float = 300.0,
              log: Callable[[str], None] = lambda s: print(s, file=sys.stderr, flush=True)) -> list[NodeInfo]:
    """Every node of `node.nnodes` agrees on what to run, or every node that can tell raises a
    DistributedError naming the node and the setting; at most `timeout` seconds. Returns all nodes' info."""
    node.validate()
    mine = node_info(node, recipe, accelerate_config)
    if node.nnodes == 1:
        return [mine]
    deadline = time.monotonic() + timeout
    log(f"node {node.node_rank}/{node.nnodes}: meeting the other nodes at {node.master_addr}:{node.master_port} "
        f"(up to {timeout:g} s)")
    store = _open_store(node, timeout)

    def key(*parts) -> str:
        return HANDSHAKE_PREFIX + "/".join(map(str, parts))

    store.set(key("node", node.node_rank), json.dumps(asdict(mine)))

    if node.node_rank != 0:
        from torch.distributed import DistError

        try:
            return _follow(store, key, mine, deadline, timeout)
        except DistError as exc:
            raise DistributedError(f"{mine.name} lost the connection to node 0 at {node.master_addr}:{node.master_port} "
                                   f"during the handshake ({str(exc).splitlines()[0]}); see node 0's output") from None

    # Node 0: wait for everyone, compare, then tell them all.
    others = list(range(1, node.nnodes))
    infos = [mine]
    problems: list[str] = []
    waiting = set(others)
    while waiting and time.monotonic() < deadline:
        for r in sorted(waiting):
            if store.check([key("failed", r)]):
                problems.append(store.get(key("failed", r)).decode())
                waiting.discard(r)
            elif store.check([key("node", r)]):
                other = NodeInfo.parse(store.get(key("node", r)))
                infos.append(other)
                problems += disagreements(mine, other)
                waiting.discard(r)
        if problems:
            break
        if waiting:
            _wait(store, [key("node", min(waiting))], min(deadline, time.monotonic() + 0.5))
    if waiting and not problems:
        problems.append(
            f"node(s) {', '.join(map(str, sorted(waiting)))} did not join within {timeout:g} s (--nnodes {node.nnodes}, "
            f"--rdzv-timeout): start `llmtune train ... --node-rank R --master-addr {node.master_addr} --master-port "
            f"{node.master_port}` on each, and check they reach this machine")
    verdict = "go" if not problems else "; ".join(problems)
    store.set(key("go"), verdict)
    # Keep the store up until every node that came has read the verdict, then free the port for accelerate.
    came = [r for r in others if store.check([key("node", r)])]
    _wait(store, [key("done", r) for r in came], min(deadline, time.monotonic() + (30 if not problems else 10)))
    del store
    if problems:
        raise DistributedError(f"node 0 ({mine.host}): " + "; ".join(problems))
    log(f"node 0: all {node.nnodes} nodes agree (recipe {mine.recipe}, {node.nnodes} x {node.nproc} processes)")
    infos.sort(key=lambda i: i.node_rank)
    return infos


def _follow(store, key, mine: NodeInfo, deadline: float, timeout: float) -> list[NodeInfo]:
    """A node other than 0: compare with node 0's settings, then wait for node 0's verdict on everyone."""
    if _wait(store, [key("node", 0)], deadline):
        raise DistributedError(f"{mine.name}: node 0 did not post its settings within {timeout:g} s (--rdzv-timeout)")
    reference = NodeInfo.parse(store.get(key("node", 0)))
    problems = disagreements(reference, mine)
    if problems:
        message = f"{mine.name} cannot train with {reference.name}: " + "; ".join(problems)
        store.set(key("failed", mine.node_rank), message)
        store.set(key("done", mine.node_rank), "1")
        raise DistributedError(message)
    if _wait(store, [key("go")], deadline):
        raise DistributedError(f"{mine.name}: node 0 did not confirm the other nodes within {timeout:g} s "
                               f"(--rdzv-timeout); see node 0's output")
    verdict = store.get(key("go")).decode()
    store.set(key("done", mine.node_rank), "1")
    if verdict != "go":
        raise DistributedError(f"{mine.name}: node 0 stopped the run: {verdict}")
    return [reference, mine]


# ---------------------------------------------------------------------------------------------
# Inside the training processes: the rank group


def launched_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


@dataclass
class RankGroup:
    """This process's place in the run, and small all-rank exchanges over gloo."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    node_rank: int = 0
    host: str = field(default_factory=socket.gethostname)
    _group: Any = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def name(self) -> str:
        return f"rank {self.rank} on node {self.node_rank} ({self.host})"

    def gather(self, value: Any) -> list[Any]:
        """`value` from every rank, in rank order (picklable, small)."""
        if not self.distributed:
            return [value]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, value, group=self._group)
        return out

    def barrier(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            dist.barrier(group=self._group)

    def agree(self, what: str, value: Any, explain: Callable[[Any, str, Any, str], str] | None = None,
              hint: str = "") -> Any:
        """Every rank holds the same `value`, or every rank raises the same error naming the ranks that
        differ from rank 0 and how. Returns rank 0's value."""
        entries = self.gather((self.name, value))
        head_name, head = entries[0]
        odd = [(n, v) for n, v in entries[1:] if v != head]
        if odd:
            show = explain or (lambda v, n, h, hn: f"{v!r} on {n}, {h!r} on {hn}")
            shown = "; ".join(show(v, n, head, head_name) for n, v in odd[:4])
            raise DistributedError(f"{what} differs across ranks: {shown}{'; ' + hint if hint else ''}")
        return head

    def check_recipe(self, recipe) -> str:
        """The same resolved recipe on every rank (whatever launched them); returns its fingerprint."""
        settings = recipe_settings(recipe)
        return self.agree(
            "the resolved recipe", (fingerprint(settings), settings),
            lambda v, n, head, hn: setting_differences(v[1], head[1], n, hn),
            "give every node the same recipe file and overrides",
        )[0]


_GROUP: RankGroup | None = None


def join_group(cpu: bool, timeout_s: float = 1800.0) -> RankGroup:
    """This process's RankGroup; initialises torch.distributed from the launcher's environment (RANK,
    WORLD_SIZE, MASTER_ADDR/PORT) when launched on several ranks. The Trainer reuses that process group."""
    global _GROUP
    if _GROUP is not None:
        return _GROUP
    world = launched_world_size()
    node_rank = int(os.environ.get("GROUP_RANK", os.environ.get("NODE_RANK", "0")))
    if world == 1:
        _GROUP = RankGroup(node_rank=node_rank)
        return _GROUP
    import torch
    import torch.distributed as dist

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "gloo" if cpu else "nccl"
        fsdp_cpu_side = fsdp_enabled() and (
            os.environ.get("FSDP_OFFLOAD_PARAMS", "false").lower() == "true"
            or os.environ.get("FSDP_STATE_DICT_TYPE", "SHARDED_STATE_DICT") == "FULL_STATE_DICT")
        if not cpu and fsdp_cpu_side:
            backend = "cuda:nccl,cpu:gloo"  # what accelerate picks for FSDP offload / full state dicts
        if not cpu:
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
    group = None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
    _GROUP = RankGroup(dist.get_rank(), dist.get_world_size(), local_rank, node_rank, socket.gethostname(), group)
    return _GROUP
