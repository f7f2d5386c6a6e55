"""Files on any filesystem: bytes, JSON, listing and deletion, local or object store.

Which library, and why (the one place that says so): everything goes through Beam's
``FileSystems`` (local paths, ``gs://``, ``s3://``, ...), which is what the pipeline's
readers and writers use on the workers, so a path means the same thing at launch and in the
job, with the same credentials. fsspec is used only for a scheme Beam does not know
(``memory://``, say). gcsfs is not used: footers are already read concurrently through
FileSystems (``parquet.read_footers``, a thread pool), and what FileSystems lacks on GCS
(object generations, create-if-absent) comes from the google-cloud-storage client Beam
itself holds (``gcs_client``).

Object stores have no directories: ``gs://b/out/labels`` does not "exist" even when
``gs://b/out/labels/part-0.parquet`` does. So a directory here is always a *prefix*:
``list_under`` and ``delete_under`` list and delete every object below it, recursively,
on every filesystem.

Paths are literal: ``gs://b/out[1Z]`` is that prefix, never ``out1/`` and ``outZ/``. Only
``match`` takes a glob, and ``glob_escape`` makes any path one that matches only itself.

Beam is imported inside the functions: this module is imported by the command line and by
model loading, which must stay cheap to import.
"""
from __future__ import annotations

import functools
import importlib
import json
import os
import re
import shutil


def is_url(path: str) -> bool:
    return "://" in path


def join(base: str, *parts: str) -> str:
    if not is_url(base):
        return os.path.join(base, *parts)
    return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])


def absolute(path: str) -> str:
    """Local paths made absolute (so an artifact that records them works from any cwd)."""
    return path if is_url(path) else os.path.abspath(path)


# the filesystems the `titans` command leaves out of its start-up when no argument names a URL
# (titans.pipeline.cli.startup.HIDDEN_LOCAL); Beam finds a filesystem by its class, once imported
URL_FILESYSTEMS = ("apache_beam.io.gcp.gcsfilesystem", "apache_beam.io.aws.s3filesystem",
                   "apache_beam.io.azure.blobstoragefilesystem")
_filesystems_loaded = False


def filesystems():
    """Beam's FileSystems, with every filesystem for URLs it can load (see URL_FILESYSTEMS)."""
    global _filesystems_loaded
    from apache_beam.io.filesystems import FileSystems

    if not _filesystems_loaded:
        for name in URL_FILESYSTEMS:
            try:
                importlib.import_module(name)
            except ImportError:  # its client library is not installed, as Beam allows
                pass
        _filesystems_loaded = True
    _anonymous_on_a_local_gcs_api()
    return FileSystems


def _anonymous_on_a_local_gcs_api() -> None:
    """With STORAGE_EMULATOR_HOST set (a local GCS API, as in the tests), connect anonymously
    at once. Beam would first look for Google credentials, retrying with backoff when there
    are none: 18.6 s of sleeps in every process (measured), most of a small gs:// run."""
    if not os.environ.get("STORAGE_EMULATOR_HOST"):
        return
    from apache_beam.internal.gcp import auth  # private: the credentials cache of this process

    with auth._Credentials._credentials_lock:
        auth._Credentials._credentials_init = True  # cached "no credentials": anonymous


def _beam_knows(path: str) -> bool:
    if not is_url(path):
        return True
    try:
        filesystems().get_filesystem(path)
        return True
    except ValueError:  # "Unable to get filesystem from specified path"
        return False


def open_read(path: str):
    """A binary file object for reading (Parquet footers, model files, ...)."""
    if not is_url(path):
        return open(path, "rb")
    if _beam_knows(path):
        return filesystems().open(path, compression_type="uncompressed")
    import fsspec

    return fsspec.open(path, "rb").open()


def open_write(path: str):
    """A binary file object for writing (a local file's directories are created)."""
    if not is_url(path):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        return open(path, "wb")
    if _beam_knows(path):
        return filesystems().create(path, compression_type="uncompressed")
    import fsspec

    return fsspec.open(path, "wb").open()


def rename(src: str, dst: str) -> None:
    """Move one file (an object store copies, then deletes)."""
    if not is_url(src):
        os.replace(src, dst)
    elif _beam_knows(src):
        filesystems().rename([src], [dst])
    else:
        import fsspec

        fs, _ = fsspec.core.url_to_fs(src)
        fs.mv(fsspec.core.url_to_fs(src)[1], fsspec.core.url_to_fs(dst)[1])


def read_bytes(path: str) -> bytes:
    with open_read(path) as f:
        return f.read()


def write_bytes(path: str, data: bytes) -> None:
    """Write a whole file. A local file is written beside its final name and renamed into
    place, so a reader never sees half of it; an object store's upload is atomic already."""
    if not is_url(path):
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    elif _beam_knows(path):
        with filesystems().create(path, compression_type="uncompressed") as f:
            f.write(data)
    else:
        import fsspec

        with fsspec.open(path, "wb") as f:
            f.write(data)


def read_json(path: str):
    return json.loads(read_bytes(path))


def write_json(path: str, data) -> None:
    write_bytes(path, (json.dumps(data, indent=2, default=str) + "\n").encode("utf-8"))


def exists(path: str) -> bool:
    """Whether a file (an object, on an object store) is at exactly ``path`` (never a glob)."""
    if not is_url(path):
        return os.path.isfile(path)
    if _beam_knows(path):
        return filesystems().exists(path)  # GCS, S3: a lookup of that one name
    import fsspec

    fs, p = fsspec.core.url_to_fs(path)
    return fs.isfile(p)


def kind(path: str) -> str | None:
    """What is at ``path``: ``"file"`` (a file, an object), ``"dir"`` (a directory; on an object
    store, some object's name starts with ``path/``) or None (nothing)."""
    if not is_url(path):
        return "file" if os.path.isfile(path) else "dir" if os.path.isdir(path) else None
    if not path.endswith("/") and exists(path):
        return "file"
    return "dir" if next(iter(_list_prefix(path.rstrip("/") + "/")), None) else None


# ---------------------------------------------------------------- listing, literal and glob
# A path is always literal here: "gs://b/out[1Z]" is that prefix, never out1/ and outZ/. Beam's
# FileSystems.match takes every path as a pattern (and GCS's delete matches its paths first),
# so listing and deleting go by prefix: an object store's own prefix listing, os.walk locally.

_MAGIC = "*?["


def has_magic(path: str) -> bool:
    return any(ch in path for ch in _MAGIC)


def glob_escape(path: str) -> str:
    """A glob (see ``match``) that matches ``path`` only: ``[``, ``*`` and ``?`` bracketed."""
    return "".join(f"[{ch}]" if ch in _MAGIC else ch for ch in path)


def _literal_prefix(pattern: str) -> tuple[str, bool]:
    """(the unescaped part of ``pattern`` before its first glob character, whether the
    whole pattern is that literal)."""
    out, i = [], 0
    while i < len(pattern):
        ch = pattern[i]
        if ch == "[" and pattern[i + 1:i + 2] in tuple(_MAGIC) and pattern[i + 2:i + 3] == "]":
            out.append(pattern[i + 1])
            i += 3
        elif ch in _MAGIC:
            return "".join(out), False
        else:
            out.append(ch)
            i += 1
    return "".join(out), True


def _translate(pattern: str) -> re.Pattern:
    """Beam's glob syntax as a regex: ``*`` within a path segment, ``**`` across them, ``?``
    one character, ``[...]`` a class (``[!...]`` negated); ``[*]``, ``[?]``, ``[[]`` are the
    characters themselves (``glob_escape``)."""
    i, n, res = 0, len(pattern), []
    while i < n:
        ch = pattern[i]
        i += 1
        if ch == "*":
            if i < n and pattern[i] == "*":
                res.append(".*")
                i += 1
            else:
                res.append(r"[^/\\]*")
        elif ch == "?":
            res.append(".")
        elif ch == "[":
            j = i + 1 if i < n and pattern[i] == "!" else i
            if j < n and pattern[j] == "]":
                j += 1
            while j < n and pattern[j] != "]":
                j += 1
            if j >= n:
                res.append(re.escape("["))
            else:
                stuff = pattern[i:j]
                negate = stuff.startswith("!")
                body = "".join("\\" + c if c in "\\^[]" else c for c in stuff[negate:])
                res.append(f"[{'^' if negate else ''}{body}]")
                i = j + 1
        else:
            res.append(re.escape(ch))
    return re.compile("(?s)" + "".join(res) + r"\Z")


def match(pattern: str) -> list[tuple[str, int]]:
    """Sorted (path, size) of the files matching the glob ``pattern`` (local or URL), listed
    below its literal prefix only. A pattern without glob characters is one literal path."""
    prefix, literal = _literal_prefix(pattern)
    if literal:
        size = _size(prefix)
        return [] if size is None else [(prefix, size)]
    regex = _translate(pattern)
    if is_url(pattern):
        found = _list_prefix(prefix)
    else:
        cut = prefix.rfind(os.sep) + 1
        top, rest = prefix[:cut], pattern[len(glob_escape(prefix[:cut])):]
        found = _walk(top, recursive="/" in rest or "**" in rest)
    return sorted((p, s) for p, s in found if regex.match(p))


def _size(path: str) -> int | None:
    """The size of the file at exactly ``path``; None if there is none."""
    if not is_url(path):
        try:
            return os.path.getsize(path) if os.path.isfile(path) else None
        except OSError:
            return None
    if _beam_knows(path):
        fs = filesystems().get_filesystem(path)
        if not fs.exists(path):  # one lookup of that name
            return None
        return fs.metadata(path).size_in_bytes
    import fsspec

    fs, p = fsspec.core.url_to_fs(path)
    return fs.size(p) if fs.isfile(p) else None


def _is_gcs(fs) -> bool:
    return type(fs).__name__ == "GCSFileSystem"


def _gcsio(fs=None):
    """The GcsIO of Beam's GCS filesystem ``fs`` (with the options Beam was given)."""
    fs = filesystems().get_filesystem("gs://b/o") if fs is None else fs
    make = getattr(fs, "_gcsIO", None)
    if make is not None:
        return make()
    from apache_beam.io.gcp.gcsio import GcsIO

    return GcsIO()


@functools.lru_cache(maxsize=1)
def gcs_client():
    """The google-cloud-storage client Beam uses for gs:// (its credentials; anonymous on a
    local GCS API), one per process: for what FileSystems does not offer, object generations
    and create-if-absent preconditions (content keys, the output lock)."""
    return _gcsio().client


def _walk(top: str, recursive: bool):
    """(path, size) of the files in the local directory ``top`` ("" is the current one, and
    paths then stay relative), below it too if ``recursive``. Like Beam's local listing,
    symlinked directories below ``top`` are not followed."""
    root = top or "."
    if not os.path.isdir(root):
        return
    if recursive:
        entries = ((os.path.join(d, f), f) for d, _, files in os.walk(root) for f in files)
    else:
        entries = ((e.path, e.name) for e in os.scandir(root) if e.is_file())
    for path, _ in entries:
        if not top and path.startswith("." + os.sep):
            path = path[2:]
        try:
            yield path, os.path.getsize(path)
        except OSError:  # gone meanwhile, a dangling link
            pass


def _list_prefix(prefix: str):
    """(path, size) of every object whose name starts with the string ``prefix`` (a URL), by
    the object store's own prefix listing: nothing in ``prefix`` is a pattern."""
    if _beam_knows(prefix):
        fs = filesystems().get_filesystem(prefix)
        if _is_gcs(fs):
            for path, (size, _) in _gcsio(fs).list_files(prefix, with_metadata=True):
                yield path, size
            return
        if not fs.has_dirs():  # S3, Azure: _list is their prefix listing
            for m in fs._list(prefix):
                if m.path.startswith(prefix):
                    yield m.path, m.size_in_bytes
            return
        # a filesystem with directories (HDFS): Beam's match, the prefix escaped
        top = prefix if prefix.endswith("/") else prefix.rsplit("/", 1)[0] + "/"
        for m in filesystems().match([glob_escape(top) + "**"])[0].metadata_list:
            if m.path.startswith(prefix):
                yield m.path, m.size_in_bytes
        return
    import fsspec

    fs, p = fsspec.core.url_to_fs(prefix)
    protocol = prefix.split("://", 1)[0]
    top = p if p.endswith("/") else p.rsplit("/", 1)[0]
    try:
        found = fs.find(top, detail=True)
    except FileNotFoundError:
        return
    for name, info in found.items():
        path = f"{protocol}://{name.lstrip('/')}" if protocol != "file" else name
        if path.startswith(prefix):
            yield path, info.get("size") or 0


def list_under(prefix: str) -> list[str]:
    """Every file (object) below the directory ``prefix``, recursively, hidden ones included.
    ``prefix`` is literal: a name with glob characters is that name."""
    if not is_url(prefix):
        if not os.path.isdir(prefix):
            return []
        return sorted(os.path.join(d, f) for d, _, files in os.walk(prefix) for f in files)
    return sorted(p for p, _ in _list_prefix(prefix.rstrip("/") + "/"))


def delete_under(prefix: str) -> int:
    """Delete everything below the directory ``prefix`` (and, locally, the directory).
    Returns how many files were deleted."""
    paths = list_under(prefix)
    if not is_url(prefix):
        if os.path.isdir(prefix):
            shutil.rmtree(prefix)
        return len(paths)
    _delete_exactly(paths)
    return len(paths)


def delete(path: str) -> None:
    """Delete the one file at exactly ``path`` if it is there."""
    if not is_url(path):
        if os.path.isfile(path):
            os.remove(path)
    elif exists(path):
        _delete_exactly([path])


def _delete_exactly(paths: list[str]) -> None:
    """Delete these objects by name. Beam's GCS delete would match each path as a glob first
    (``out[1Z]/x`` deletes ``out1/x`` and not itself), so GCS objects are deleted in batches
    by name; other Beam filesystems delete the paths they are given."""
    if not paths:
        return
    if _beam_knows(paths[0]):
        fs = filesystems().get_filesystem(paths[0])
        if _is_gcs(fs):
            failed = [f"{p}: {e}" for p, e in _gcsio(fs).delete_batch(paths) if e is not None]
            if failed:
                raise OSError(f"cannot delete {len(failed)} object(s): " + "; ".join(failed[:5]))
        else:
            fs.delete(paths)
        return
    import fsspec

    fs, _ = fsspec.core.url_to_fs(paths[0])
    for p in paths:
        fs.rm_file(fsspec.core.url_to_fs(p)[1])
