"""Content keys: what says that a file or a model is the very version a job used.

A name says nothing about contents: a file rewritten in place keeps its path, often its size
(same rows, new values) and, after a copy that preserves times (``cp -p``, ``rsync -a``,
``gsutil cp -P``), its modification time. So a key holds what the store can tell cheaply:

* input files (``file_keys``): the size and the modification time (as Beam's
  ``FileSystems.match`` reports it, so keys written by older manifests still compare), and
    - on GCS, the object's ``generation`` (a new one with every upload, even of the same
      bytes) and ``crc32c``, from one listing per directory with the google-cloud-storage
      client Beam's GCS filesystem uses (Beam's match metadata does not carry them);
    - elsewhere (local files, other stores), the SHA-256 of the Parquet footer: the row
      groups' offsets and the columns' statistics, which differ after almost any rewrite; two
      small reads at the end of the file;
* models (``model_key``): the size and the SHA-256 of the bytes, streamed.

Keys are plain JSON objects; ``changes`` names the fields that differ and
``describe_file_changes`` words the differences between two {path: key} maps, one line per
file. Nothing here knows about phases or manifests: `titans label`'s phases.json and the
--skip-labeled manifest both store these keys (and a future job-directory object can own
them along with phases.json and the output lock).
"""
from __future__ import annotations

import hashlib
import os
import struct
from concurrent.futures import ThreadPoolExecutor

from titans.transforms.io import storage

CHUNK = 8 << 20            # bytes read at a time when hashing a model
MAX_FOOTER = 64 << 20      # a longer "footer" is not a Parquet footer: not hashed
LIST_FROM = 32             # files of one GCS directory from which it is listed, not looked up
_MAGIC = b"PAR1"


def file_keys(paths: list[str], footers: bool = True, threads: int = 16) -> dict[str, dict]:
    """{path: key} for ``paths`` (files that exist; a missing one has no entry). Keys:
    ``size``, ``mtime`` and either ``generation`` and ``crc32c`` (GCS) or, with ``footers``,
    ``footer_sha256`` (the Parquet footer's hash; None for a file that is not Parquet)."""
    keys: dict[str, dict] = {}
    gcs = [p for p in paths if p.startswith("gs://")]
    local = [p for p in paths if not storage.is_url(p)]
    other = [p for p in paths if storage.is_url(p) and not p.startswith("gs://")]
    if gcs:
        keys.update(_gcs_keys(gcs))
    for path in local:
        try:
            st = os.stat(path)
        except FileNotFoundError:
            continue
        keys[path] = {"size": st.st_size, "mtime": st.st_mtime}
    if other:
        keys.update(_beam_keys(other))
    if footers:
        plain = [p for p in keys if "generation" not in keys[p]]
        if plain:
            with ThreadPoolExecutor(min(threads, len(plain))) as pool:
                for path, digest in zip(plain, pool.map(footer_sha256, plain)):
                    keys[path]["footer_sha256"] = digest
    return keys


def model_key(path: str) -> dict:
    """{"size", "sha256"} of a model file, read ``CHUNK`` bytes at a time."""
    digest, size = hashlib.sha256(), 0
    with storage.open_read(path) as f:
        while True:
            chunk = f.read(CHUNK)
            if not chunk:
                break
            digest.update(chunk)
            size += len(chunk)
    return {"size": size, "sha256": digest.hexdigest()}


def footer_sha256(path: str) -> str | None:
    """SHA-256 of a Parquet file's footer (its metadata and the length and magic after it);
    None when the file does not end like a Parquet file."""
    try:
        with storage.open_read(path) as f:
            f.seek(0, os.SEEK_END)
            end = f.tell()
            if end < 12:
                return None
            f.seek(end - 8)
            tail = f.read(8)
            length = struct.unpack("<I", tail[:4])[0]
            if tail[4:] != _MAGIC or length > min(MAX_FOOTER, end - 12):
                return None
            f.seek(end - 8 - length)
            return hashlib.sha256(f.read(length) + tail).hexdigest()
    except (OSError, ValueError, struct.error):  # unreadable here: the launch checks say why
        return None


def changes(recorded: dict | None, current: dict | None) -> list[str]:
    """The fields in which two keys differ, sorted (["missing"] if either is None)."""
    if recorded is None or current is None:
        return [] if recorded is current else ["missing"]
    return sorted(k for k in set(recorded) | set(current) if recorded.get(k) != current.get(k))


def describe_file_changes(recorded: dict[str, dict], current: dict[str, dict],
                          limit: int = 5) -> list[str]:
    """One phrase per file that differs between two {path: key} maps: new, gone, or changed
    (naming the fields), at most ``limit`` of them and a count of the rest."""
    out = []
    for path in sorted(set(recorded) | set(current)):
        if path not in recorded:
            out.append(f"input file {path} is new")
        elif path not in current:
            out.append(f"input file {path} is gone")
        else:
            diff = changes(recorded[path], current[path])
            if diff:
                out.append(f"input file {path} changed ({', '.join(diff)})")
    if len(out) > limit:
        out = out[:limit] + [f"{len(out) - limit} more file(s)"]
    return out


# --------------------------------------------------------------------------- the stores

def _gcs_keys(paths: list[str]) -> dict[str, dict]:
    """One listing per directory asked for ``LIST_FROM`` files or more (a day's partition is
    one request), then one lookup per file the listings missed; names are literal (no glob)."""
    try:
        client = storage.gcs_client()
    except ImportError:  # apache-beam without [gcp]: sizes and times only
        return _beam_keys(paths)
    by_dir: dict[tuple[str, str], set] = {}
    for path in paths:
        bucket, _, name = path[len("gs://"):].partition("/")
        by_dir.setdefault((bucket, name.rpartition("/")[0]), set()).add(name)
    keys = {}
    for (bucket, directory), names in by_dir.items():
        prefix = f"{directory}/" if directory else ""
        # a listing returns the whole directory: worth it for many of its files, not for the
        # few of one read group (workers take keys group by group, see manifest.py)
        found = {b.name: b for b in client.list_blobs(bucket, prefix=prefix, delimiter="/")
                 if b.name in names} if len(names) >= LIST_FROM else {}
        for name in sorted(names - set(found)):
            blob = client.bucket(bucket).get_blob(name)
            if blob is not None:
                found[name] = blob
        for name, blob in found.items():
            keys[f"gs://{bucket}/{name}"] = {
                # the time as Beam's match reports it, so manifests written before compare
                "size": int(blob.size), "mtime": _beam_seconds(blob.updated),
                "generation": int(blob.generation), "crc32c": blob.crc32c}
    return keys


def _beam_keys(paths: list[str]) -> dict[str, dict]:
    """Sizes and times from Beam's FileSystems, one literal lookup per file (fsspec for a
    scheme Beam does not know)."""
    keys = {}
    for path in paths:
        if storage._beam_knows(path):  # pylint: disable=protected-access
            fs = storage._beam_fs().get_filesystem(path)  # pylint: disable=protected-access
            if fs.exists(path):
                m = fs.metadata(path)
                keys[path] = {"size": int(m.size_in_bytes),
                              "mtime": _seconds(m.last_updated_in_seconds)}
            continue
        import fsspec

        fs, p = fsspec.core.url_to_fs(path)
        if fs.isfile(p):
            info = fs.info(p)
            keys[path] = {"size": int(info["size"]), "mtime": _seconds(info.get("mtime"))}
    return keys


def _beam_seconds(updated) -> float:
    from apache_beam.io.gcp import gcsio

    return gcsio.GcsIO._updated_to_seconds(updated)  # pylint: disable=protected-access


def _seconds(value) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):  # filesystems that do not report a time
        return None


__all__ = ["file_keys", "model_key", "footer_sha256", "changes", "describe_file_changes"]
