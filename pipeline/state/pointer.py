"""``DIR/current.json``: the one small file that says which generation of a ``--state``
directory is current, and the only file a commit replaces.

A generation folder is written in full first; pointing ``current.json`` at it is the commit.
Replacing the pointer is atomic and conditional on the pointer still being the one the run
started from (its *token*):
  * local: the new pointer is written and fsynced beside the old one, the old one is read
    back and compared, then ``os.replace`` (one rename; the lock keeps other writers out);
  * ``gs://``: an upload with ``ifGenerationMatch`` = the pointer object's generation when
    the run read it (0: "only if there is none"), so of two writers only one can win even
    without the lock;
  * other object stores: compare, then write (not atomic; a warning says so).
The token is the pointer's GCS generation, or its bytes elsewhere; None: no pointer.
"""
from __future__ import annotations

import logging
import os
import sys
import time

from titans.transforms.io import storage

_LOG = logging.getLogger("titans")

POINTER = "current.json"
PAUSE_ENV = "TITANS_STATE_PAUSE_AT"


class Changed(Exception):
    """The pointer is no longer the one the run started from."""


def pause(point: str) -> None:
    """Test hook: with TITANS_STATE_PAUSE_AT=point in the environment, say so on stderr and
    sleep here, so that a test can kill the process at exactly this point. The points, in
    order: write:student, write:pool, write:state (store.write_generation), commit:pointer
    (the new pointer ready, the old one still current), commit:done (replaced)."""
    if os.environ.get(PAUSE_ENV) == point:
        print(f"titans-state-paused {point}", file=sys.stderr, flush=True)
        time.sleep(3600)


def _blob(path: str):
    bucket, name = path[5:].split("/", 1)
    return storage.gcs_client().bucket(bucket).blob(name)


def read(root: str) -> tuple[bytes | None, object]:
    """(the pointer's bytes or None when there is none, its token)."""
    path = storage.join(root, POINTER)
    if path.startswith("gs://"):
        from google.api_core.exceptions import NotFound, PreconditionFailed

        for _ in range(5):  # replaced between the lookup and the download: look again
            blob = _blob(path)
            found = blob.bucket.get_blob(blob.name)
            if found is None:
                return None, None
            generation = found.generation  # before the download, which may reset it
            try:
                return found.download_as_bytes(if_generation_match=generation), generation
            except (NotFound, PreconditionFailed):
                continue
        raise OSError(f"{path} keeps changing while it is read")
    if not storage.exists(path):
        return None, None
    data = storage.read_bytes(path)
    return data, data


def replace(root: str, data: bytes, token) -> object:
    """Make ``data`` the pointer if it is still ``token``; Changed otherwise. Returns the new
    token."""
    path = storage.join(root, POINTER)
    if path.startswith("gs://"):
        from google.api_core.exceptions import NotFound, PreconditionFailed

        if read(root)[1] != token:  # also where a GCS API ignores preconditions (the tests')
            raise Changed()
        pause("commit:pointer")
        blob = _blob(path)
        try:
            blob.upload_from_string(data, content_type="application/json",
                                    if_generation_match=token or 0)
        except (PreconditionFailed, NotFound) as e:
            raise Changed() from e
        return blob.generation
    if storage.is_url(path):
        _LOG.warning("%s: this object store has no conditional write here; the state's pointer "
                     "is compared, then written, which is not atomic", path)
        if read(root)[1] != token:
            raise Changed()
        pause("commit:pointer")
        storage.write_bytes(path, data)
        return data
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    try:
        if read(root)[1] != token:
            raise Changed()
        pause("commit:pointer")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    fsync_dir(root)
    return data


def fsync_dir(directory: str) -> None:
    """Make a rename in ``directory`` durable (a power cut after the commit keeps it)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
