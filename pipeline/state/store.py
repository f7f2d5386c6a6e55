"""A ``--state DIR`` of `titans label`: a student that keeps learning from the teacher across
scheduled runs, stored as generations, one current at a time.

Layout (readable without titans: JSON, Parquet and a TorchScript file; docs/architecture.md,
"State directory"):

    DIR/current.json              which generation is current: {state_version, generation,
                                  folder, state_sha256}; replacing it is the commit (pointer.py)
    DIR/gen-000007-1a2b3c4d/      one generation, written in full before it is made current:
        state.json                state_version, generation, created, teacher {path, sha256},
                                  feature_schema, student {file, sha256, arch, config},
                                  lineage [...], pool {file, rows, runs, sha256},
                                  history {file, runs, sha256}
        student.pt                the student (TorchScript)
        pool.parquet              teacher-labelled rows (pool.py); absent when the cap is 0
        history.json              one entry per run (history.py)
    DIR/history.png               teacher share, threshold, fresh agreement by run
    DIR/_titans_lock              while a run holds the state (pipeline/output_lock.py)

Only the current generation and the one before it are kept; a folder no pointer names (a
run killed while writing it) is deleted after the next commit. A run that fails or is killed
before ``commit`` leaves ``current.json``, and so the state, exactly as it was.

Every file a generation holds is named with its SHA-256 in state.json, and state.json's in
current.json: ``current()`` checks them all, so a damaged file is one StateError line naming
it, before anything is written.
"""
from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import logging
import os
import socket
import uuid

import pyarrow as pa
import pyarrow.parquet as pq

from titans.pipeline import output_lock
from titans.pipeline.state import history as history_view
from titans.pipeline.state import pointer
from titans.pipeline.state import pool as pool_rule
from titans.transforms.io import storage

_LOG = logging.getLogger("titans")

STATE_VERSION = 1
STATE, STUDENT, POOL, HISTORY, PLOT = "state.json", "student.pt", "pool.parquet", \
    "history.json", "history.png"
GEN_PREFIX = "gen-"
RESET = "--state-reset starts over with a fresh lineage"


class StateError(ValueError):
    """A state directory that cannot be used as it is: one line naming the file or the
    mismatch, and the fix."""


class StateLocked(StateError):
    """Another run holds the state directory."""


@dataclasses.dataclass(frozen=True)
class State:
    """One committed generation, read-only."""
    root: str
    generation: int
    path: str                       # the generation's folder
    meta: dict                      # state.json
    history: list
    student_path: str | None
    pool_path: str | None
    token: object = dataclasses.field(default=None, repr=False, compare=False)  # pointer's
    _read: dict = dataclasses.field(default_factory=dict, repr=False, compare=False)

    @property
    def folder(self) -> str:
        return _name(self.path)

    def __getstate__(self) -> dict:
        # pickled without the pool it has read: a State reaches the cascade's last step (the
        # report's history entry), and Beam pickles that step into every bundle; with the
        # pool in it (5.6 MB, bz2) a warm run spent about 1.5 s more than a cold one
        return {**self.__dict__, "_read": {}}

    def read_pool(self) -> pa.Table | None:
        """The pool's rows (None when this generation keeps none), checked against its hash;
        read once per State (a warm run uses it for the fine-tune and again for the next pool;
        Arrow tables are immutable, so sharing it is safe)."""
        if self.pool_path is None:
            return None
        if "pool" not in self._read:
            data = self._read.pop("pool_bytes", None)  # current() read and checked it already
            if data is None:
                data = _read(self.pool_path)
                _check_sha(data, self.meta["pool"].get("sha256"), self.pool_path)
            try:
                self._read["pool"] = pq.read_table(pa.BufferReader(data))
            except Exception as e:  # noqa: BLE001 - any Arrow error is a damaged file here
                raise StateError(_damaged(self.pool_path, f"not Parquet ({e})")) from e
        return self._read["pool"]


@dataclasses.dataclass(frozen=True)
class Pending:
    """A generation written in full but not current yet (``StateDir.commit`` makes it so)."""
    base: State | None
    generation: int
    path: str
    meta: dict
    history: list
    state_sha256: str
    expected: object                # the pointer token the commit requires
    previous_folder: str | None     # kept after the commit, beside the new one


class StateDir:
    """DIR of ``--state``: local path or ``gs://`` (any URL storage.py knows)."""

    def __init__(self, root: str):
        self.root = root.rstrip("/") if storage.is_url(root) else root
        self._lock: output_lock.Lock | None = None
        self._reset: tuple[object, str | None] | None = None  # (pointer token, its folder)

    # ------------------------------------------------------------------ the lock
    def lock(self, command: str = "label") -> output_lock.Lock:
        """Take DIR's lock (a context manager; also ``.release()``), or StateLocked naming the
        holder. A lock left by a run that is no longer running on this host (killed) is taken
        over; one held from another host is never taken over here, since this machine cannot
        tell whether that run is alive: the refusal says which file to delete if it is not.
        (The one race left: a dead local holder's lock replaced by another host's run between
        the look and the take-over; output_lock then takes it over with a warning.)"""
        try:
            self._lock = output_lock.acquire(self.root, command, overwrite=False)
            return self._lock
        except output_lock.OutputLocked as e:
            refused = e
        holder = _holder(self.root)
        if holder is None or holder.get("host") == socket.gethostname():
            try:  # takes over only a holder that is gone (or a lock that cannot be read)
                self._lock = output_lock.acquire(self.root, command, overwrite=True)
                return self._lock
            except output_lock.OutputLocked as e:
                refused, holder = e, _holder(self.root) or {}
        if holder.get("host") == socket.gethostname():
            raise StateLocked(f"state {self.root!r} is in use by {output_lock.describe(holder)}, "
                              f"still running on this host; wait for it to end") from refused
        raise StateLocked(f"state {self.root!r} is locked by {output_lock.describe(holder)} on "
                          f"another host, which may still be running; wait for it to end, or "
                          f"delete {output_lock.lock_path(self.root)} if it is not") from refused

    def _require_lock(self, what: str) -> None:
        if self._lock is None or self._lock.released:
            raise RuntimeError(f"StateDir.{what} needs the state's lock (StateDir.lock())")

    # ------------------------------------------------------------------ reading
    def current(self) -> State | None:
        """The current generation, checked in full; None for an empty or new DIR (or after
        ``reset``). StateError, one line naming the file, if anything is damaged."""
        if self._reset is not None:
            return None
        data, token = pointer.read(self.root)
        if data is None:
            return None
        where = storage.join(self.root, pointer.POINTER)
        ptr = _parse_json(data, where)
        if not isinstance(ptr.get("folder"), str) or not ptr["folder"].startswith(GEN_PREFIX) \
                or "/" in ptr["folder"] or not isinstance(ptr.get("state_sha256"), str):
            raise StateError(_damaged(where, "it names no generation folder"))
        _check_version(ptr.get("state_version"), where)
        path = storage.join(self.root, ptr["folder"])
        state_file = storage.join(path, STATE)
        meta = _parse_json(_read(state_file), state_file, ptr["state_sha256"])
        _check_version(meta.get("state_version"), state_file)
        for key in ("generation", "teacher", "feature_schema", "student", "lineage", "pool",
                    "history"):
            if key not in meta:
                raise StateError(_damaged(state_file, f"it has no {key!r}"))
        hist_file = storage.join(path, meta["history"]["file"])
        hist = _parse_json(_read(hist_file), hist_file, meta["history"].get("sha256"))
        if not isinstance(hist, list):
            raise StateError(_damaged(hist_file, "it is not a list of runs"))
        student = storage.join(path, meta["student"]["file"])
        _check_sha(None, meta["student"].get("sha256"), student)
        pool_file = meta["pool"].get("file")
        pool_path = storage.join(path, pool_file) if pool_file else None
        state = State(self.root, int(meta["generation"]), path, meta, hist, student, pool_path,
                      token)
        if pool_path:  # read once: checked here, parsed by read_pool (no second download)
            data = _read(pool_path)
            _check_sha(data, meta["pool"].get("sha256"), pool_path)
            state._read["pool_bytes"] = data
        return state

    def check_compatible(self, state: State, teacher_sha256: str, feature_schema: dict) -> None:
        """StateError (one line, naming --state-reset) unless ``state`` was written for this
        teacher and this feature schema."""
        was = state.meta.get("teacher", {})
        if was.get("sha256") != teacher_sha256:
            raise StateError(f"state {self.root!r} was written for another teacher (sha256 "
                             f"{str(was.get('sha256'))[:12]}..., {was.get('path')}), not this "
                             f"--teacher (sha256 {teacher_sha256[:12]}...): pass that teacher, "
                             f"or {RESET}")
        old, new = _normal(state.meta.get("feature_schema")), _normal(feature_schema)
        if old != new:
            keys = sorted(set(old) | set(new)) if isinstance(old, dict) and isinstance(new, dict) \
                else []
            diff = "; ".join(f"{k}: {old.get(k)!r} in the state, {new.get(k)!r} now"
                             for k in keys if old.get(k) != new.get(k)) or f"{old!r} -> {new!r}"
            raise StateError(f"state {self.root!r} was written for another feature schema "
                             f"({diff[:300]}): {RESET}")

    # ------------------------------------------------------------------ writing
    def reset(self) -> None:
        """--state-reset: ``current()`` is None from now on and the next commit (of a
        ``write_generation(base=None)``) replaces whatever is current, damaged or not. Nothing
        is deleted here: a run that fails before its commit leaves the old state."""
        self._require_lock("reset")
        data, token = pointer.read(self.root)
        folder = None
        try:
            folder = json.loads(data)["folder"] if data is not None else None
        except (ValueError, KeyError, TypeError):
            pass
        self._reset = (token, folder if isinstance(folder, str) else None)

    def write_generation(self, base: State | None, *, student_file: str, student: dict,
                         lineage_entry: dict, pool: pa.Table | None, pool_cap: int,
                         history_entry: dict, teacher: dict, feature_schema: dict) -> Pending:
        """Write generation ``base.generation + 1`` (1 without a base) in full in a new folder:
        the student's bytes (copied from ``student_file``), the pool cut by ``pool.cap``,
        history.json, then state.json. Not current until ``commit``."""
        self._require_lock("write_generation")
        if base is None and self._reset is None and pointer.read(self.root)[0] is not None:
            raise StateError(f"state {self.root!r} has a current generation: write on it "
                             f"(base=current()), or {RESET}")
        generation = base.generation + 1 if base else 1
        folder = f"{GEN_PREFIX}{generation:06d}-{uuid.uuid4().hex[:8]}"
        path = storage.join(self.root, folder)
        student_bytes = storage.read_bytes(student_file)
        student_sha = _sha(student_bytes)
        _write(storage.join(path, STUDENT), student_bytes)
        pointer.pause("write:student")

        kept = None if pool is None else pool_rule.cap(pool, pool_cap)
        pool_meta = {"file": None, "rows": 0, "runs": 0, "sha256": None, "cap": pool_cap}
        if kept is not None and kept.num_rows:
            sink = pa.BufferOutputStream()
            pq.write_table(kept, sink)
            pool_bytes = sink.getvalue().to_pybytes()
            _write(storage.join(path, POOL), pool_bytes)
            pool_meta.update(file=POOL, rows=kept.num_rows, runs=pool_rule.runs_in(kept),
                             sha256=_sha(pool_bytes), bytes=len(pool_bytes))
        pointer.pause("write:pool")

        # every run is kept (history and lineage grow by ~1 KB a run; the pool is what is
        # capped), so len(history) counts the lineage's runs
        runs = (base.history if base else []) + [history_entry]
        hist_bytes = _json_bytes(runs)
        _write(storage.join(path, HISTORY), hist_bytes)
        parent = base.meta["student"].get("sha256") if base else None
        entry = {"parent_sha256": parent, **lineage_entry, "generation": generation,
                 "student_sha256": student_sha}
        meta = {
            "state_version": STATE_VERSION,
            "about": "a titans label --state generation; layout in titans' docs/architecture.md",
            "generation": generation,
            "created": datetime.datetime.now(datetime.timezone.utc)
            .isoformat(timespec="seconds").replace("+00:00", "Z"),
            "teacher": dict(teacher),
            "feature_schema": _normal(feature_schema),
            "student": {**student, "file": STUDENT, "sha256": student_sha},
            "lineage": (base.meta["lineage"] if base else []) + [entry],
            "pool": pool_meta,
            "history": {"file": HISTORY, "runs": len(runs), "sha256": _sha(hist_bytes)},
        }
        state_bytes = _json_bytes(meta)
        _write(storage.join(path, STATE), state_bytes)
        pointer.pause("write:state")
        if base is not None:
            expected, previous = base.token, base.folder
        elif self._reset is not None:
            expected, previous = self._reset
        else:
            expected, previous = None, None
        return Pending(base, generation, path, json.loads(state_bytes), runs, _sha(state_bytes),
                       expected, previous)

    def commit(self, pending: Pending) -> State:
        """Make ``pending`` current, only if the current generation is still its base
        (StateError otherwise, and nothing changes); then delete the generations before the
        previous one and any unfinished folder, and draw DIR/history.png."""
        self._require_lock("commit")
        if pending.path != storage.join(self.root, _name(pending.path)):
            raise RuntimeError(f"{pending.path} is not a generation of {self.root}")
        folder = _name(pending.path)
        data = _json_bytes({"state_version": STATE_VERSION, "generation": pending.generation,
                            "folder": folder, "state_sha256": pending.state_sha256})
        if not storage.is_url(self.root):  # the folder's names durable before it is named
            pointer.fsync_dir(pending.path)
            pointer.fsync_dir(self.root)
        try:
            token = pointer.replace(self.root, data, pending.expected)
        except pointer.Changed as e:
            self._collect_quietly(pending.path)  # this run's own folder: nothing names it
            raise StateError(f"state {self.root!r} changed while this run wrote generation "
                             f"{pending.generation} (another run made its own current?); "
                             f"nothing of this run was made current") from e
        self._reset = None
        pointer.pause("commit:done")
        self._collect({folder, pending.previous_folder})
        try:
            history_view.plot(pending.history, storage.join(self.root, PLOT))
        except Exception as e:  # noqa: BLE001 - a figure never undoes a commit
            _LOG.warning("could not draw %s: %s", storage.join(self.root, PLOT), e)
        meta = pending.meta
        pool_path = storage.join(pending.path, POOL) if meta["pool"]["file"] else None
        return State(self.root, pending.generation, pending.path, meta, pending.history,
                     storage.join(pending.path, STUDENT), pool_path, token)

    def generations(self) -> list[str]:
        """The generation folders in DIR, committed or not, sorted."""
        if not storage.is_url(self.root):
            if not os.path.isdir(self.root):
                return []
            return sorted(n for n in os.listdir(self.root) if n.startswith(GEN_PREFIX)
                          and os.path.isdir(os.path.join(self.root, n)))
        prefix = self.root + "/"
        return sorted({p[len(prefix):].split("/", 1)[0] for p in storage.list_under(self.root)
                       if p[len(prefix):].startswith(GEN_PREFIX) and "/" in p[len(prefix):]})

    def _collect_quietly(self, path: str) -> None:
        try:
            storage.delete(path) if storage.kind(path) == "file" else storage.delete_under(path)
        except OSError as e:
            _LOG.warning("could not delete %s: %s", path, e)

    def _collect(self, keep: set) -> None:
        if not storage.is_url(self.root):  # a pointer left half-replaced by a killed commit
            for name in os.listdir(self.root):
                if name.startswith(pointer.POINTER + ".tmp-"):
                    self._collect_quietly(os.path.join(self.root, name))
        for name in self.generations():
            if name not in keep:
                try:
                    storage.delete_under(storage.join(self.root, name))
                except OSError as e:  # left for the next commit
                    _LOG.warning("could not delete the old state generation %s: %s", name, e)


# ------------------------------------------------------------------------------ helpers

def _name(path: str) -> str:
    return path.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]


def _holder(root: str) -> dict | None:
    """The JSON of DIR's lock, if there is a readable one."""
    try:
        found = storage.read_json(output_lock.lock_path(root))
    except (OSError, ValueError):
        return None
    return found if isinstance(found, dict) else None


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _json_bytes(value) -> bytes:
    return (json.dumps(value, indent=2, sort_keys=False, default=str) + "\n").encode("utf-8")


def _normal(value):
    """``value`` as it reads back from JSON (tuples as lists, ...), for comparing."""
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def _damaged(path: str, why: str) -> str:
    return f"state file {path} is damaged ({why}); nothing was written: {RESET}"


def _read(path: str) -> bytes:
    return _reading(path, storage.read_bytes)


def _reading(path: str, read):
    """``read(path)``; a file that is not there (whatever the filesystem raises) is a
    StateError naming it."""
    try:
        return read(path)
    except Exception as e:  # noqa: BLE001 - Beam's filesystems raise their own errors
        try:
            there = storage.exists(path)
        except Exception:  # noqa: BLE001 - the original error says more
            there = True
        if not there:
            raise StateError(_damaged(path, "missing")) from e
        raise


def _write(path: str, data: bytes) -> None:
    if not storage.is_url(path):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    storage.write_bytes(path, data)
    if not storage.is_url(path):  # durable before the pointer names it
        with open(path, "rb") as f:
            os.fsync(f.fileno())


def _parse_json(data: bytes, path: str, sha256: str | None = None):
    if sha256 is not None:
        _check_sha(data, sha256, path)
    try:
        value = json.loads(data)
    except ValueError as e:
        raise StateError(_damaged(path, f"not JSON: {e}")) from e
    if not isinstance(value, (dict, list)):
        raise StateError(_damaged(path, "not a JSON object"))
    return value


def _check_sha(data: bytes | None, want: str | None, path: str) -> None:
    """``data``'s (or, when None, the file's, read in chunks) SHA-256 is ``want``."""
    if data is None:
        got = _reading(path, _file_sha)
    else:
        got = _sha(data)
    if got != want:
        raise StateError(_damaged(path, f"its SHA-256 is {got[:12]}..., not the {str(want)[:12]}... "
                                        f"recorded for it"))


def _file_sha(path: str) -> str:
    digest = hashlib.sha256()
    with storage.open_read(path) as f:  # in chunks: a pool can be large
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def _check_version(version, path: str) -> None:
    if version == STATE_VERSION:
        return
    if isinstance(version, int) and version > STATE_VERSION:
        raise StateError(f"state file {path} has state_version {version}, newer than this "
                         f"titans reads ({STATE_VERSION}): upgrade titans, or {RESET}")
    raise StateError(_damaged(path, f"state_version {version!r}, expected {STATE_VERSION}"))
