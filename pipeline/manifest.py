"""Incremental labeling: a manifest of the input files finished runs have labeled.

``--skip-labeled MANIFEST`` (a JSON file, local or gs://) makes a run leave out every input
file the manifest lists with the same path, size and last-modified time, so rerunning a day
or a backfill never labels a file twice. A listed file whose size or time changed is
labeled again (and the log says so).

    {"format": "titans-manifest/1",
     "files": {"gs://b/events/dt=2026-11-28/part-0.parquet":
               {"size": 1048576, "mtime": 1795906031.9, "output": "gs://b/labels/dt=2026-11-28",
                "command": "run", "labeled_at": "2026-11-29T02:14:07Z"}, ...}}

Sizes and times come from Beam's ``FileSystems.match`` (``size_in_bytes``,
``last_updated_in_seconds``): on GCS the object's update time, which changes with every
overwrite (a new generation), so a rewritten object is labeled again.

The manifest is written only by a run that completes (status complete, after ``_SUCCESS``),
from inside the pipeline (``stages.finish``), so a Dataflow job whose launcher does not wait
records its files too; a killed job or one over its dead-letter budget records nothing, and
its files are labeled again next time. Every file of a completed job is recorded, including
files whose rows all went to the dead letter (they are in ``dead_letter/`` with a reason).

``--overwrite`` deletes the labels of the output directory's previous run: files the
manifest says were labeled into that same directory are then labeled again, unless every
input file is already labeled (then nothing runs and nothing is deleted).

Writes are read-modify-write: jobs that share one manifest must not run at the same time
(the Airflow DAG runs one day at a time).
"""
from __future__ import annotations

import dataclasses
import logging
import os
import time

from titans.models import storage

_LOG = logging.getLogger("titans")
FORMAT = "titans-manifest/1"


class NothingToLabel(Exception):
    """Every input file is already in the manifest: the command exits 0 without a job."""


@dataclasses.dataclass(frozen=True)
class FileState:
    """What identifies a version of a file: its size and last-modified time."""
    size: int
    mtime: float | None

    def to_dict(self) -> dict:
        return {"size": self.size, "mtime": self.mtime}


def file_states(files) -> dict[str, FileState]:
    """{path: FileState} for ``files``: one listing per directory they are in (one request
    for a day's partition on GCS), then one match per file the listings missed."""
    fs = storage._beam_fs()  # pylint: disable=protected-access  # FileSystems, set up for gs://
    by_dir: dict[str, set] = {}
    for path in files:
        by_dir.setdefault(_parent(path), set()).add(path)
    found = {}
    for directory, wanted in by_dir.items():
        try:
            listing = fs.match([storage.join(directory, "*")])[0].metadata_list
        except Exception:  # noqa: BLE001 - fall back to matching the files one by one
            listing = []
        found.update({m.path: m for m in listing if m.path in wanted})
    missing = sorted(set(files) - set(found))
    if missing:
        for result in fs.match(missing):
            found.update({m.path: m for m in result.metadata_list})
    return {path: FileState(int(m.size_in_bytes), _seconds(m.last_updated_in_seconds))
            for path, m in found.items()}


def _parent(path: str) -> str:
    return path.rsplit("/", 1)[0] if storage.is_url(path) else os.path.dirname(path) or "."


def _seconds(value) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):  # filesystems that do not report a time
        return None


def _key(path: str) -> str:
    return storage.absolute(path).rstrip("/")


def read(url: str) -> dict[str, dict]:
    """{path: entry} of the manifest at ``url``; empty when there is none yet."""
    if not storage.exists(url):
        return {}
    try:
        data = storage.read_json(url)
    except Exception as e:  # noqa: BLE001 - unreadable or not JSON: say which file
        raise ValueError(f"--skip-labeled {url!r} cannot be read as a titans manifest: {e}") from e
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(
            data.get("files"), dict):
        raise ValueError(f"--skip-labeled {url!r} is not a titans manifest (expected "
                         f"{{\"format\": \"{FORMAT}\", \"files\": {{...}}}})")
    return data["files"]


def unlabeled(url: str, files: list[str], output: str, overwrite: bool) -> list[str]:
    """The input ``files`` that still need labeling, logging what is skipped and why files
    are labeled again. NothingToLabel when there are none."""
    labeled = read(url)
    states = file_states(files)
    todo, skipped, changed = [], [], []
    for path in files:
        entry, state = labeled.get(_key(path)), states.get(path)
        if entry is None or state is None:
            todo.append(path)
        elif (entry.get("size"), entry.get("mtime")) == (state.size, state.mtime):
            skipped.append(path)
        else:
            changed.append(path)
            _LOG.info("%s changed since it was labeled (size %s -> %s, modified %s -> %s): "
                      "labeling it again", path, entry.get("size"), state.size,
                      entry.get("mtime"), state.mtime)
    if not todo and not changed:
        raise NothingToLabel(f"all {len(files)} input file(s) are already labeled according to "
                             f"{url}; nothing to do (no job started, nothing written)")
    if overwrite and skipped:
        # --overwrite is about to delete the labels of `output`: files labeled there go again
        same = [p for p in skipped if _key(labeled[_key(p)].get("output") or "") == _key(output)]
        if same:
            _LOG.warning("--overwrite replaces the labels in %s, where %d of the skipped file(s) "
                         "were labeled: they are labeled again", output, len(same))
            skipped = [p for p in skipped if p not in set(same)]
    if skipped:
        _LOG.info("--skip-labeled: %d of %d input file(s) already labeled (%s); labeling %d",
                  len(skipped), len(files), url, len(files) - len(skipped))
    keep = set(skipped)
    return [p for p in files if p not in keep]


@dataclasses.dataclass(frozen=True)
class Record:
    """Adds a completed job's input files to the manifest; called in the pipeline after
    ``_SUCCESS`` (see ``stages._Finish``), so it is pickled with the job."""
    url: str
    files: dict  # {path: FileState as dict}, taken when the pipeline was built
    output: str
    command: str

    def __call__(self, report: dict) -> None:
        files = read(self.url)
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        for path, state in self.files.items():
            files[_key(path)] = {**state, "output": _key(self.output),
                                 "command": self.command, "labeled_at": stamp}
        storage.write_json(self.url, {"format": FORMAT, "files": dict(sorted(files.items()))})


def record_for(plan, command: str) -> Record | None:
    """The manifest update of a planned job, or None without --skip-labeled. The files'
    sizes and times are read now, before the pipeline reads any file: a file rewritten
    while the job runs has a newer time than the one recorded, so it is labeled again."""
    url = plan.config.skip_labeled
    if not url:
        return None
    states = file_states(list(plan.input.source.files))
    return Record(url, {p: s.to_dict() for p, s in states.items()}, plan.config.output, command)
