"""One job at a time per output directory: a lock object taken at launch.

``OUTPUT/_titans_lock`` is created only if absent -- locally with ``O_CREAT | O_EXCL``, on
``gs://`` with the precondition ``ifGenerationMatch=0`` -- and holds JSON naming the run that
holds it: its id, command, host, pid (with the pid's start time, so that a reused pid is not
taken for the holder) and start time. A second run into the same output refuses with one line
naming the holder. The lock is taken before anything in the output is deleted or probed, and
released when the job ends, whatever the ending.

A lock whose holder is gone (a killed run) stays behind. It yields to ``--overwrite`` (and to
``titans label --resume``), with a log line, except that a holder on this host whose process
is still alive is never taken over. A holder on another host cannot be checked: ``--overwrite``
takes its lock over, with a warning.

A launcher that does not wait for its job (``run_job(wait=False)``, a Dataflow or Flex
Template launch) hands the lock to the job: the job's last step (``stages.finish``) releases
it, whether the job completed or failed its dead-letter budget (before the step raises
``JobFailed``). A Dataflow job that fails before that step leaves its lock; the next run says
so and ``--overwrite`` takes it over.

The lock file is not an output: ``--overwrite`` never deletes it, and it does not make an
output directory "not empty" (``is_lock``).

Object stores other than GCS (s3://, fsspec's) have no create-if-absent here: the lock is
checked, written and read back, which narrows but does not close the race between two runs
started at the same moment (a warning says so).

The module knows only an output location, so it can later live inside a job-directory object.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import os
import socket
import time
import uuid

from titans.transforms.io import storage

_LOG = logging.getLogger("titans")

LOCK = "_titans_lock"


class OutputLocked(ValueError):
    """Another run holds the output's lock (a launch error: one line, exit code 2)."""


def lock_path(output: str) -> str:
    return storage.join(output, LOCK)


def is_lock(path: str) -> bool:
    """Whether ``path`` (a file listed under an output) is an output lock, not an output."""
    return path.replace("\\", "/").rsplit("/", 1)[-1] == LOCK


# ------------------------------------------------------------------------------ the lock

@dataclasses.dataclass
class Lock:
    """A held output lock. ``release()`` (or leaving a ``with`` block) removes it if it is
    still this run's; once released, or once handed to the job, ``release()`` does nothing."""
    output: str
    holder: dict
    generation: int | None = None   # the lock object's generation, on GCS
    created_dir: bool = False        # the output directory was made for the lock (local)
    released: bool = False
    handed_to_job: bool = False

    @property
    def path(self) -> str:
        return lock_path(self.output)

    @property
    def id(self) -> str:
        return self.holder["id"]

    def release(self) -> None:
        if self.released or self.handed_to_job:
            return
        self.released = True
        try:
            _remove(self.path, self.id, self.generation)
        except Exception as e:  # noqa: BLE001 - never hide the job's own ending behind this
            _LOG.warning("could not release the output lock %s: %s", self.path, e)
            return
        if self.created_dir:  # a launch that failed its checks leaves no empty directory
            try:
                os.rmdir(self.output)
            except OSError:
                pass

    def job_release(self) -> "JobRelease":
        return JobRelease(self.path, self.id, self.generation)

    def handed_over(self) -> None:
        """The job has it now (it was handed with ``hand_to_job`` and the job was started):
        its last step releases it, not this process."""
        self.handed_to_job = True

    def __enter__(self) -> "Lock":
        return self

    def __exit__(self, *exc) -> bool:
        self.release()
        return False


@dataclasses.dataclass(frozen=True)
class JobRelease:
    """Picklable: releases the lock ``lock_id`` from inside the job (a Dataflow worker)."""
    path: str
    lock_id: str
    generation: int | None = None

    def __call__(self) -> None:
        _remove(self.path, self.lock_id, self.generation)
        _LOG.info("released the output lock %s", self.path)


_JOB_RELEASE = "_titans_output_lock_release"


def hand_to_job(pipeline, lock: Lock) -> None:
    """Let ``pipeline``'s last step release ``lock`` (for a launcher that will not wait); call
    before the pipeline is built, and ``lock.handed_over()`` once it has been started."""
    setattr(pipeline, _JOB_RELEASE, lock.job_release())


def release_by_job(pipeline) -> JobRelease | None:
    """What the pipeline's last step calls when it is done, if the launcher handed it a lock."""
    return getattr(pipeline, _JOB_RELEASE, None)


# ------------------------------------------------------------------------------ acquiring

def acquire(output: str, command: str, overwrite: bool = False) -> Lock:
    """Take ``output``'s lock for ``titans COMMAND``, or raise OutputLocked naming its holder.

    ``overwrite`` (--overwrite, or titans label's --resume): a lock whose holder is gone is
    taken over, with a log line; a holder alive on this host is never taken over."""
    path = lock_path(output)
    holder = _holder(command)
    data = _encode(holder)
    created_dir = False
    if not storage.is_url(output) and not os.path.isdir(output):
        try:
            os.makedirs(output)
            created_dir = True
        except FileExistsError:
            pass
        except OSError as e:
            raise ValueError(f"cannot create output directory {output!r}: {e}") from e
    for _ in range(5):  # a lock that vanished between our create and our read: try again
        try:
            generation = _create(path, data)
        except OSError as e:
            raise ValueError(f"cannot write to output directory {output!r}: {e}") from e
        if generation is not False:
            _LOG.info("output lock %s taken (run %s)", path, holder["id"])
            return Lock(output, holder, generation, created_dir)
        found = _read(path)
        if found is None:
            continue
        other, other_generation = found
        alive = _alive(other)
        if alive or not overwrite:
            if created_dir:
                _rmdir_quietly(output)
            raise OutputLocked(_refusal(output, other, alive, command))
        generation = _take_over(path, other, other_generation, data)
        if generation is False:
            continue  # someone else changed the lock meanwhile: look again
        _LOG.warning("took over the output lock of %s, which %s", describe(other),
                     "is no longer running" if alive is False else
                     "ran on another host (this machine cannot tell whether it is still running)")
        return Lock(output, holder, generation, created_dir)
    raise OutputLocked(f"output {output!r}: its lock {path} keeps changing; another run is "
                       f"starting there")


def describe(holder: dict) -> str:
    """``titans run`` (run 1a2b..., host h, pid 123, started 2026-...Z)."""
    if "command" not in holder:
        return f"an unreadable lock ({holder.get('unreadable', '')[:80]!r})"
    return (f"`titans {holder.get('command')}` (run {holder.get('id')}, host "
            f"{holder.get('host')}, pid {holder.get('pid')}, started {holder.get('started')})")


def _refusal(output: str, other: dict, alive: bool | None, command: str) -> str:
    take_over = "--overwrite or --resume" if command == "label" else "--overwrite"
    if "command" not in other:
        return (f"output {output!r} has a lock file that cannot be read ({lock_path(output)}: "
                f"a run killed while taking it?); pass {take_over} to take it over")
    if alive:
        return (f"output {output!r} is in use by {describe(other)}, still running on this "
                f"host; wait for it to end, or choose another --output")
    if alive is False:
        return (f"output {output!r} is locked by {describe(other)}, which is no longer running "
                f"(killed?); pass {take_over} to take its lock over and replace its outputs")
    return (f"output {output!r} is locked by {describe(other)} on another host, which may still "
            f"be running; wait for it to end, or pass {take_over} to take its lock over")


def _holder(command: str) -> dict:
    now = time.time()
    return {"id": uuid.uuid4().hex[:16], "command": command, "host": socket.gethostname(),
            "pid": os.getpid(), "pid_started": _pid_started(os.getpid()),
            "started": datetime.datetime.fromtimestamp(now, datetime.timezone.utc)
            .isoformat(timespec="seconds").replace("+00:00", "Z"),
            "started_at": now}


def _encode(holder: dict) -> bytes:
    return (json.dumps(holder, indent=2) + "\n").encode("utf-8")


def _pid_started(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (Linux), to tell a reused pid."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return int(f.read().rsplit(b")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def _alive(holder: dict) -> bool | None:
    """Whether the holder is running: True/False on this host, None on another (or unknown)."""
    if "command" not in holder:
        return False  # unreadable for a while: a run killed between creating and writing it
    if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
        return None
    pid = holder["pid"]
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # someone else's process: alive
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            if f.read().rsplit(b")", 1)[1].split()[0] == b"Z":
                return False  # killed, not yet reaped
    except (OSError, IndexError):
        pass
    started = holder.get("pid_started")
    now = _pid_started(pid)
    if started is not None and now is not None and started != now:
        return False  # the pid was reused by another process
    return True


def _rmdir_quietly(path: str) -> None:
    try:
        os.rmdir(path)
    except OSError:
        pass


# ------------------------------------------------------------------------------ filesystems
# _create: the generation (None where there is none) or False when a lock is there already;
# _read: (holder, generation) or None when there is no lock; _take_over: as _create, but
# only in place of the lock ``(other, generation)``; _remove: only the lock ``lock_id``.

def _gcs(path: str):
    """(the google-cloud-storage blob of a gs:// path, PreconditionFailed, NotFound)."""
    from google.api_core.exceptions import NotFound, PreconditionFailed

    return storage.gcs_client().bucket(path[5:].split("/", 1)[0]).blob(path[5:].split("/", 1)[1]), \
        PreconditionFailed, NotFound


def _create(path: str, data: bytes):
    if not storage.is_url(path):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return None
    if path.startswith("gs://"):
        if _read(path) is not None:  # the common case, and on a GCS API that ignores the
            return False             # precondition (the local one in the tests) the only check
        blob, precondition_failed, _ = _gcs(path)
        try:  # create only if absent: of two runs at the same moment, one gets a 412
            blob.upload_from_string(data, content_type="application/json", if_generation_match=0)
        except precondition_failed:
            return False
        return blob.generation
    # no create-if-absent on this store: check, write, read back
    _LOG.warning("%s: this object store has no create-if-absent here; the output lock is "
                 "checked, written and read back, which is not atomic", path)
    if storage.exists(path):
        return False
    storage.write_bytes(path, data)
    found = _read(path)
    return None if found and found[0].get("id") == json.loads(data)["id"] else False


def _read(path: str) -> tuple[dict, int | None] | None:
    for attempt in range(20):
        generation = None
        try:
            if path.startswith("gs://"):
                blob, _, not_found = _gcs(path)
                try:
                    blob = blob.bucket.get_blob(blob.name)
                    if blob is None:
                        return None
                    generation = blob.generation
                    text = blob.download_as_bytes(if_generation_match=generation)
                except not_found:
                    return None
            else:
                if not storage.exists(path):
                    return None
                text = storage.read_bytes(path)
        except FileNotFoundError:
            return None
        except Exception as e:  # noqa: BLE001 - e.g. the lock changed while it was read
            text = str(e).encode()
        try:
            holder = json.loads(text)
            if isinstance(holder, dict):
                return holder, generation
        except ValueError:
            pass
        time.sleep(0.05)  # a lock being written (created empty, then filled): look again
    return {"unreadable": text.decode("utf-8", "replace")}, generation


def _take_over(path: str, other: dict, generation: int | None, data: bytes):
    if path.startswith("gs://"):
        blob, precondition_failed, not_found = _gcs(path)
        try:  # only in place of the very lock that was judged stale
            blob.upload_from_string(data, content_type="application/json",
                                    if_generation_match=generation)
        except (precondition_failed, not_found):
            return False
        return blob.generation
    if not storage.is_url(path):
        # move the stale lock aside (one taker wins the rename), check that it was the lock we
        # judged stale, then create ours exclusively
        aside = f"{path}.stale-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            os.rename(path, aside)
        except FileNotFoundError:
            return False
        try:
            with open(aside, "rb") as f:
                moved = json.loads(f.read() or b"{}")
        except (OSError, ValueError):
            moved = {}
        if moved.get("id") != other.get("id"):  # a fresh lock, taken meanwhile: put it back
            try:
                os.link(aside, path)
            except OSError:
                pass
            os.remove(aside)
            return False
        os.remove(aside)
        return _create(path, data)
    storage.delete(path)
    return _create(path, data)


def _remove(path: str, lock_id: str, generation: int | None) -> None:
    found = _read(path)
    if found is None or found[0].get("id") != lock_id:
        return  # gone already, or taken over by another run: not ours to remove
    if path.startswith("gs://"):
        blob, precondition_failed, not_found = _gcs(path)
        try:
            blob.delete(if_generation_match=found[1] if generation is None else generation)
        except (precondition_failed, not_found):
            pass
        return
    storage.delete(path)
