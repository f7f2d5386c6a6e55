"""Files on any filesystem: bytes, JSON, listing and deletion, local or object store.

Everything goes through Beam's ``FileSystems`` (local paths, ``gs://``, ``s3://``, ...),
which is what the pipeline's readers and writers use; fsspec is used only for a scheme Beam
does not know (``memory://``, say), so a URL works the same in every command.

Object stores have no directories: ``gs://b/out/labels`` does not "exist" even when
``gs://b/out/labels/part-0.parquet`` does. So a directory here is always a *prefix*:
``list_under`` and ``delete_under`` list and delete every object below it, recursively,
on every filesystem.

Beam is imported inside the functions: this module is imported by the command line and by
model loading, which must stay cheap to import.
"""
from __future__ import annotations

import json
import os
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


def _beam_fs():
    from apache_beam.io.filesystems import FileSystems

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
        _beam_fs().get_filesystem(path)
        return True
    except ValueError:  # "Unable to get filesystem from specified path"
        return False


def open_read(path: str):
    """A binary file object for reading (Parquet footers, model files, ...)."""
    if not is_url(path):
        return open(path, "rb")
    if _beam_knows(path):
        return _beam_fs().open(path, compression_type="uncompressed")
    import fsspec

    return fsspec.open(path, "rb").open()


def open_write(path: str):
    """A binary file object for writing (a local file's directories are created)."""
    if not is_url(path):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        return open(path, "wb")
    if _beam_knows(path):
        return _beam_fs().create(path, compression_type="uncompressed")
    import fsspec

    return fsspec.open(path, "wb").open()


def rename(src: str, dst: str) -> None:
    """Move one file (an object store copies, then deletes)."""
    if not is_url(src):
        os.replace(src, dst)
    elif _beam_knows(src):
        _beam_fs().rename([src], [dst])
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
        with _beam_fs().create(path, compression_type="uncompressed") as f:
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
    """Whether a file (an object, on an object store) is at ``path``."""
    if not is_url(path):
        return os.path.isfile(path)
    if _beam_knows(path):
        return _beam_fs().exists(path)
    import fsspec

    fs, p = fsspec.core.url_to_fs(path)
    return fs.isfile(p)


def list_under(prefix: str) -> list[str]:
    """Every file (object) below the directory ``prefix``, recursively, hidden ones included."""
    if not is_url(prefix):
        if not os.path.isdir(prefix):
            return []
        return sorted(os.path.join(d, f) for d, _, files in os.walk(prefix) for f in files)
    if _beam_knows(prefix):
        fs = _beam_fs()
        result = fs.match([join(prefix, "**")])[0]
        return sorted(m.path for m in result.metadata_list)
    import fsspec

    fs, p = fsspec.core.url_to_fs(prefix)
    protocol = prefix.split("://", 1)[0]
    return sorted(f"{protocol}://{f}" for f in fs.find(p))


def delete_under(prefix: str) -> int:
    """Delete everything below the directory ``prefix`` (and, locally, the directory).
    Returns how many files were deleted."""
    paths = list_under(prefix)
    if not is_url(prefix):
        if os.path.isdir(prefix):
            shutil.rmtree(prefix)
        return len(paths)
    if paths:
        if _beam_knows(prefix):
            _beam_fs().delete(paths)
        else:
            import fsspec

            fs, _ = fsspec.core.url_to_fs(prefix)
            fs.rm([fsspec.core.url_to_fs(p)[1] for p in paths])
    return len(paths)


def delete(path: str) -> None:
    """Delete one file if it is there."""
    if not exists(path):
        return
    if not is_url(path):
        os.remove(path)
    elif _beam_knows(path):
        _beam_fs().delete([path])
    else:
        import fsspec

        fs, p = fsspec.core.url_to_fs(path)
        fs.rm(p)
