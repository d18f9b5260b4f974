"""The node's state files in its data dir: the API token, the keyring, the peer snapshot, the
core's durable state (own incarnation, keyring operations seen), the query clock and the replay
marks.

(The node identity key is `crypto.NodeIdentity.load_or_create`.) Files holding secrets are
written 0600 in a 0700 directory. The peer snapshot lets a restarted node rejoin without seeds
and start above the incarnation the mesh may remember of its last run. The query state lets it ask
at the mesh's query time at once and keeps a replayed query a duplicate across the restart.
"""

from __future__ import annotations

import logging
import os
import secrets
import stat
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from meshd.core.messages import MemberState
from meshd.core.node import MemberView
from meshd.core.query import QueryState
from meshd.crypto import Keyring, read_key_file, write_private
from meshd.errors import ConfigError

log = logging.getLogger("meshd")

__all__ = [
    "CORE_STATE_FILE",
    "KEYRING_FILE",
    "QUERY_STATE_FILE",
    "REPLAY_FILE",
    "SNAPSHOT_FILE",
    "TOKEN_FILE",
    "CoreState",
    "CoreStateKeeper",
    "PeerSnapshot",
    "ReplayState",
    "load_keyring",
    "load_or_create_token",
    "prepare_data_dir",
    "read_core_state",
    "read_query_state",
    "read_replay_state",
    "read_snapshot",
    "save_keyring",
    "snapshot_doc",
    "write_core_state",
    "write_query_state",
    "write_replay_state",
    "write_snapshot",
]

KEYRING_FILE = "keyring.json"
TOKEN_FILE = "api-token"  # noqa: S105 - a file name, not a secret
SNAPSHOT_FILE = "peers.json"
CORE_STATE_FILE = "core-state.json"
# Incarnations are reserved this many at a time, so a node refuted in a loop by a liar writes
# once per INCARNATION_LEASE refutations, and a restart moves at most this far (well inside a jump).
INCARNATION_LEASE = 1000
MAX_PERSISTED_KEYOPS = 1024  # read bound; the core keeps its own, smaller window
SNAPSHOT_MAX_PEERS = 128
QUERY_STATE_FILE = "query-state.json"
QUERY_STATE_MAX_IDS = 8192  # newest (ltime, id) pairs kept: the ring's recent past, bounded
_SNAPSHOT_ORDER = {MemberState.ALIVE: 0, MemberState.SUSPECT: 1, MemberState.DEAD: 2}


def prepare_data_dir(path: str) -> Path:
    d = Path(path)
    try:
        d.mkdir(mode=0o700, parents=True, exist_ok=True)
        mode = stat.S_IMODE(d.stat().st_mode)
        if mode & 0o077 and d.stat().st_uid == os.getuid():
            os.chmod(d, 0o700)  # it holds the node key and the API token
    except OSError as e:
        raise ConfigError(f"--data-dir {path}: {e.strerror or e}") from None
    if not os.access(d, os.W_OK):
        raise ConfigError(f"--data-dir {path}: not writable")
    return d


def load_or_create_token(data_dir: Path) -> str:
    path = data_dir / TOKEN_FILE
    if path.exists():
        token = path.read_text(encoding="ascii", errors="replace").strip()
        if len(token) >= 16:
            return token
        log.warning("%s is too short; writing a new token", path)
    token = secrets.token_urlsafe(32)
    write_private(path, (token + "\n").encode())
    return token


# --- keyring -------------------------------------------------------------------------------------


def load_keyring(data_dir: Path, insecure: bool, cluster_key_file: str | None) -> Keyring | None:
    """The saved keyring (it carries rotations), else one made from --cluster-key-file."""
    if insecure:
        log.warning("running --insecure: gossip and peer traffic are NOT encrypted")
        return None
    path = data_dir / KEYRING_FILE
    if path.exists():
        ring = Keyring.load(path)
        if cluster_key_file:
            key = read_key_file(cluster_key_file)
            if key not in ring:
                log.warning(
                    "--cluster-key-file %s is not in %s; the keyring file wins (it carries rotations)",
                    cluster_key_file,
                    path,
                )
        return ring
    if not cluster_key_file:
        raise ConfigError(
            "--cluster-key-file is required unless --insecure "
            "(create one with: meshd keygen cluster --out FILE)"
        )
    ring = Keyring([read_key_file(cluster_key_file)])
    ring.save(path)
    return ring


def save_keyring(data_dir: Path, ring: Keyring | None) -> None:
    """Persist a rotated keyring; a failure is logged (the running node keeps its keys)."""
    if ring is None:
        return
    try:
        ring.save(data_dir / KEYRING_FILE)
    except OSError as e:
        log.error("cannot save keyring: %s", e)


# --- peer snapshot -------------------------------------------------------------------------------


@dataclass(frozen=True)
class PeerSnapshot:
    """What the last run left: where to rejoin and the incarnation to start from."""

    start_incarnation: int = 0  # above what the mesh may remember of our last run
    peers: list[str] = field(default_factory=list)


def read_snapshot(data_dir: Path) -> PeerSnapshot:
    path = data_dir / SNAPSHOT_FILE
    if not path.exists():
        return PeerSnapshot()
    try:
        data = orjson.loads(path.read_bytes())
        peers = data.get("peers", [])
        return PeerSnapshot(
            int(data.get("incarnation", 0)) + 1,
            [str(p["addr"]) for p in peers if isinstance(p, dict) and "addr" in p][:SNAPSHOT_MAX_PEERS],
        )
    except (OSError, ValueError, TypeError, AttributeError, KeyError) as e:
        log.warning("ignoring unreadable peer snapshot %s: %s", path, e)
        return PeerSnapshot()


def snapshot_doc(
    name: str, node_id: str, addr: str, incarnation: int, members: Iterable[MemberView], saved_at: float
) -> dict[str, Any]:
    """The snapshot document: other members, alive first, then suspect, then dead."""
    peers = sorted(
        (m for m in members if m.name != name and m.state in _SNAPSHOT_ORDER),
        key=lambda m: (_SNAPSHOT_ORDER[m.state], m.name),
    )[:SNAPSHOT_MAX_PEERS]
    return {
        "version": 1,
        "name": name,
        "node_id": node_id,
        "addr": addr,
        "incarnation": incarnation,
        "saved_at": saved_at,
        "peers": [
            {"name": m.name, "id": m.node_id, "addr": m.addr, "state": m.state.name.lower()} for m in peers
        ],
    }


def write_snapshot(
    data_dir: Path, name: str, node_id: str, addr: str, incarnation: int, members: Iterable[MemberView]
) -> None:
    doc = snapshot_doc(name, node_id, addr, incarnation, members, time.time())
    try:
        write_private(data_dir / SNAPSHOT_FILE, orjson.dumps(doc, option=orjson.OPT_INDENT_2))
    except OSError as e:
        log.error("cannot write peer snapshot: %s", e)


# --- replay protection across restarts (meshd/replay.py) -------------------------------------

REPLAY_FILE = "replay.json"
REPLAY_RESUME_US = 90_000_000  # more than two snapshot intervals: stamps sent after the last write


@dataclass
class ReplayState:
    """Where this node's sender clock resumes, and the stamps it accepted before (by sender)."""

    clock_floor: int = 0
    marks: dict[str, int] = field(default_factory=dict)


def read_replay_state(data_dir: Path) -> ReplayState:
    path = data_dir / REPLAY_FILE
    if not path.exists():
        return ReplayState()
    try:
        data = orjson.loads(path.read_bytes())
        marks = data.get("marks", {})
        if not isinstance(marks, dict):
            raise TypeError("marks is not an object")
        last = data.get("clock", 0)
        if type(last) is not int or last < 0:
            raise TypeError("clock is not a count")
        good = {str(k): v for k, v in marks.items() if type(v) is int and v >= 0}
        return ReplayState(last + REPLAY_RESUME_US if last else 0, good)
    except (OSError, ValueError, TypeError, AttributeError) as e:
        log.warning("ignoring unreadable replay state %s: %s", path, e)
        return ReplayState()


def write_replay_state(data_dir: Path, clock_last: int, marks: dict[str, int]) -> None:
    try:
        write_private(
            data_dir / REPLAY_FILE, orjson.dumps({"version": 1, "clock": clock_last, "marks": marks})
        )
    except OSError as e:
        log.error("cannot write replay state: %s", e)


# --- the core's durable state --------------------------------------------------------------------


@dataclass(frozen=True)
class CoreState:
    """What the core must never forget across a restart."""

    incarnation_reserved: int = -1  # no incarnation above this was announced (-1: none yet)
    keyops: tuple[int, ...] = ()  # KeyOp ids already applied or passed on, oldest first

    @property
    def start_incarnation(self) -> int:
        return self.incarnation_reserved + 1


def read_core_state(data_dir: Path) -> CoreState:
    path = data_dir / CORE_STATE_FILE
    if not path.exists():
        return CoreState()
    try:
        data = orjson.loads(path.read_bytes())
        reserved = data["incarnation_reserved"]
        keyops = data.get("keyops", [])
        if not isinstance(reserved, int) or not all(isinstance(k, int) for k in keyops):
            raise TypeError("expected integers")
        return CoreState(max(-1, reserved), tuple(keyops[-MAX_PERSISTED_KEYOPS:]))
    except (OSError, ValueError, TypeError, AttributeError, KeyError) as e:
        # Going back in incarnation is what this file prevents; the peer snapshot still
        # carries one, and the core refutes whatever the mesh remembers above it.
        log.error("ignoring unreadable core state %s: %s", path, e)
        return CoreState()


def write_core_state(data_dir: Path, st: CoreState) -> None:
    """Atomic and fsynced (OSError on failure)."""
    doc = {"version": 1, "incarnation_reserved": st.incarnation_reserved, "keyops": list(st.keyops)}
    write_private(data_dir / CORE_STATE_FILE, orjson.dumps(doc))


class CoreStateKeeper:
    """Keeps core-state.json ahead of the running core.

    `sync` runs before the effects of every core call go out, so an incarnation is on disk
    before any peer hears it (a restart never goes back) and a KeyOp id is on disk before the
    node passes the operation on. It writes only when the incarnation leaves the reserved
    lease or a new KeyOp was seen.
    """

    def __init__(self, data_dir: Path, loaded: CoreState) -> None:
        self.data_dir = data_dir
        self.saved = loaded
        self.failures = 0

    def keyops_changed(self, keyops: list[int]) -> bool:
        return bool(keyops) and self._new_keyop(keyops[-1])

    def behind(self, incarnation: int, last_keyop: int | None) -> bool:
        """Whether `sync` would write: cheap enough to ask after every core call."""
        return incarnation > self.saved.incarnation_reserved or (
            last_keyop is not None and self._new_keyop(last_keyop)
        )

    def _new_keyop(self, op_id: int) -> bool:
        return not self.saved.keyops or self.saved.keyops[-1] != op_id

    def sync(self, incarnation: int, keyops: list[int]) -> bool:
        """Write if needed; True when the state on disk covers (incarnation, keyops)."""
        reserved = self.saved.incarnation_reserved
        if incarnation <= reserved and not self.keyops_changed(keyops):
            return True
        if incarnation > reserved:
            reserved = incarnation + INCARNATION_LEASE
        st = CoreState(reserved, tuple(keyops[-MAX_PERSISTED_KEYOPS:]))  # the core's bounded window
        try:
            write_core_state(self.data_dir, st)
        except OSError as e:
            self.failures += 1
            if self.failures == 1 or self.failures % 1000 == 0:
                log.error("cannot write core state (%d failures): %s", self.failures, e)
            return False
        self.saved = st
        return True


# --- query clock and dedupe ring -----------------------------------------------------------------


def query_state_doc(qs: QueryState) -> dict[str, Any]:
    """The query state document, newest QUERY_STATE_MAX_IDS (ltime, id) pairs at most."""
    seen: list[list[Any]] = []
    budget = QUERY_STATE_MAX_IDS
    for ltime, ids in reversed(qs.seen):  # newest first, so the budget keeps the recent ones
        if budget <= 0:
            break
        kept = list(ids[-budget:])
        budget -= len(kept)
        seen.append([ltime, kept])
    seen.reverse()
    return {"version": 1, "ltime": qs.ltime, "seen": seen}


def write_query_state(data_dir: Path, qs: QueryState) -> None:
    """Atomic (a power cut leaves the old file or the new one); a failure is logged."""
    try:
        write_private(data_dir / QUERY_STATE_FILE, orjson.dumps(query_state_doc(qs)))
    except OSError as e:
        log.error("cannot write query state: %s", e)


def _int(value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"expected an integer, got {value!r}")
    return value


def read_query_state(data_dir: Path) -> QueryState | None:
    """The last run's query state; None when there is none or it is unreadable (logged).

    Only shapes are checked here; QueryEngine.restore skips values out of its bounds.
    """
    path = data_dir / QUERY_STATE_FILE
    if not path.exists():
        return None
    try:
        data = orjson.loads(path.read_bytes())
        seen: list[tuple[int, tuple[int, ...]]] = []
        budget = QUERY_STATE_MAX_IDS
        for ltime, ids in reversed(data.get("seen", [])[-QUERY_STATE_MAX_IDS:]):  # newest first
            if budget <= 0:
                break
            kept = tuple(_int(i) for i in ids[-budget:])
            budget -= len(kept)
            seen.append((_int(ltime), kept))
        return QueryState(_int(data.get("ltime", 0)), tuple(reversed(seen)))
    except (OSError, ValueError, TypeError, AttributeError) as e:
        log.warning("ignoring unreadable query state %s: %s", path, e)
        return None
