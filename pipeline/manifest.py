"""Incremental labeling: a manifest of the input files finished runs have labeled.

``--skip-labeled MANIFEST`` (a JSON file, local or gs://) makes a run leave out every input
file the manifest lists as labeled: the same version of the file (its content key, see
``pipeline/content_keys.py``), labeled into an output that still holds those labels. So
rerunning a day or a backfill never labels a file twice, and never loses one either:

* a listed file whose content key changed (size, time, GCS generation, Parquet footer) is
  labeled again, and the log says which fields changed;
* a listed file whose output no longer holds the complete job that labeled it (the output
  was deleted by hand, or replaced by another job through ``--overwrite``) is labeled again.

    {"format": "titans-manifest/1",
     "files": {"gs://b/events/dt=2026-11-28/part-0.parquet":
               {"size": 1048576, "mtime": 1795906031.9,
                "key": {"size": 1048576, "mtime": 1795906031.9, "generation": 17959060319...,
                        "crc32c": "mnG7TA=="},
                "output": "gs://b/labels/dt=2026-11-28",
                "labels": {"files": 3, "sha256": "..."},
                "command": "run", "labeled_at": "2026-11-29T02:14:07Z"}, ...}}

Why the entry checks its output rather than the output's deletion dropping entries: a
deletion that goes through titans (``--overwrite``) could drop them, but a deletion by hand,
a lifecycle rule or a failed copy could not, and the manifest would then claim rows that
are nowhere. So an entry records the *output's labels* it relies on: ``labels`` is a digest
of the content keys of every file under ``labels/`` and ``dead_letter/``, taken once the job
put them in place (after ``_SUCCESS``); the entry counts only while ``_SUCCESS`` is there and
the digest still matches. Any later job in that directory writes new files (new times, new
generations), so the digest changes and the file is labeled again. Checking costs one
listing per output directory the input's entries name.

Entries written before content keys (``size`` and ``mtime`` only, no ``key`` nor
``labels``) are still read: the file is compared by size and time, and the entry counts
while its output holds a complete job (``_SUCCESS``). A malformed entry is a launch error
naming the manifest and the entry.

Each file's key is taken by the worker that reads it, right before reading it, and handed to
the job's last step; the job graph carries no list of files or keys (``Record``).

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
import hashlib
import json
import logging
import time

from titans.transforms.io import storage
from titans.pipeline import content_keys
from titans.pipeline.outputs import DEAD_LETTER, LABELS, SUCCESS

_LOG = logging.getLogger("titans")
FORMAT = "titans-manifest/1"


class NothingToLabel(Exception):
    """Every input file is already in the manifest: the command exits 0 without a job."""


def file_states(files) -> dict[str, dict]:
    """{path: content key} for ``files`` (``content_keys.file_keys``): one listing per
    directory on GCS, a stat and the Parquet footer's hash for a local file."""
    return content_keys.file_keys(list(files))


def output_labels_key(output: str) -> dict | None:
    """What identifies the labels a completed job left in ``output``: a digest of the
    content keys of every file under ``labels/`` and ``dead_letter/``; None when ``output``
    holds no complete job (no ``_SUCCESS``)."""
    if not storage.exists(storage.join(output, SUCCESS)):
        return None
    paths = [p for d in (LABELS, DEAD_LETTER) for p in storage.list_under(storage.join(output, d))]
    keys = content_keys.file_keys(paths, footers=False)
    base = len(output.rstrip("/")) + 1
    listing = sorted([p[base:], keys.get(p)] for p in paths)
    digest = hashlib.sha256(json.dumps(listing, sort_keys=True).encode()).hexdigest()
    return {"files": len(paths), "sha256": digest}


def _key(path: str) -> str:
    return storage.absolute(path).rstrip("/")


def read(url: str) -> dict[str, dict]:
    """{path: entry} of the manifest at ``url``; empty when there is none yet. ValueError
    (one line, naming the manifest and the entry) for a malformed one."""
    if not storage.exists(url):
        return {}
    try:
        data = storage.read_json(url)
    except Exception as e:  # noqa: BLE001 - unreadable or not JSON: say which file
        raise ValueError(f"--skip-labeled {url!r} cannot be read as a titans manifest: "
                         f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from e
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(
            data.get("files"), dict):
        raise ValueError(f"--skip-labeled {url!r} is not a titans manifest (expected "
                         f"{{\"format\": \"{FORMAT}\", \"files\": {{...}}}})")
    for path, entry in data["files"].items():
        problem = _malformed(entry)
        if problem:
            shown = json.dumps(entry, default=str)
            shown = shown if len(shown) <= 80 else shown[:77] + "..."
            raise ValueError(f"--skip-labeled {url!r}: the entry for {path!r} {problem} (it is "
                             f"{shown}); fix or remove that entry (its file is then labeled "
                             f"again)")
    return data["files"]


def _malformed(entry) -> str | None:
    """Why a manifest entry cannot be used, or None."""
    def number(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    if not isinstance(entry, dict):
        return f"is a {type(entry).__name__}, not an object"
    if not (isinstance(entry.get("size"), int) and not isinstance(entry["size"], bool)
            and entry["size"] >= 0):
        return "has no size (a whole number of bytes)"
    if entry.get("mtime") is not None and not number(entry["mtime"]):
        return "has an mtime that is not a number of seconds"
    if not isinstance(entry.get("output"), str) or not entry["output"]:
        return "names no output (the directory that holds its labels)"
    if "key" in entry and not isinstance(entry["key"], dict):
        return "has a key that is not an object"
    if "labels" in entry and not isinstance(entry["labels"], dict):
        return "has labels that are not an object"
    return None


def _file_changes(entry: dict, key: dict) -> list[str]:
    """How the file differs from the version the entry recorded: content-key fields, or
    size and mtime for an entry written before content keys."""
    if "key" in entry:
        return content_keys.changes(entry["key"], key)
    return [f for f in ("size", "mtime") if entry.get(f) != key.get(f)]


def unlabeled(url: str, files: list[str], output: str, overwrite: bool) -> list[str]:
    """The input ``files`` that still need labeling, logging what is skipped and why files
    are labeled again. NothingToLabel when there are none."""
    labeled = read(url)
    states = file_states(files)
    held: dict[str, dict | None] = {}  # output -> output_labels_key, one look per output

    def still_held(entry: dict) -> bool:
        out = entry["output"]
        if out not in held:
            held[out] = output_labels_key(out)
        if held[out] is None:
            return False
        return "labels" not in entry or entry["labels"] == held[out]

    todo, skipped, again = [], [], []
    for path in files:
        entry, state = labeled.get(_key(path)), states.get(path)
        if entry is None or state is None:
            todo.append(path)
            continue
        diff = _file_changes(entry, state)
        if diff:
            again.append(path)
            _LOG.info("%s changed since it was labeled (%s differ): labeling it again", path,
                      ", ".join(diff))
        elif not still_held(entry):
            again.append(path)
            _LOG.warning("%s was labeled into %s, which no longer holds that job's labels "
                         "(deleted, or replaced by another job): labeling it again", path,
                         entry["output"])
        else:
            skipped.append(path)
    if not todo and not again:
        raise NothingToLabel(f"all {len(files)} input file(s) are already labeled according to "
                             f"{url}; nothing to do (no job started, nothing written)")
    if overwrite and skipped:
        # --overwrite is about to delete the labels of `output`: files labeled there go again
        same = [p for p in skipped if _key(labeled[_key(p)]["output"]) == _key(output)]
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
    ``_SUCCESS`` (see ``stages._Finish``), so it is pickled with the job. It carries no file
    list: the job graph of 100,000 files would carry megabytes of keys (issue 20, 6). The
    files and their content keys come from the readers (``keys``: (path, key) pairs), each
    taken on the worker right before it read that file, so what is recorded is the version
    the job read; a file rewritten after that has another key and is labeled again. A file
    read in several parts (row groups of one big file, byte ranges of a TFRecord file) whose
    parts saw different keys changed while it was read: it is not recorded."""
    url: str
    output: str
    command: str

    def __call__(self, report: dict, keys=()) -> None:
        seen: dict[str, dict | None] = {}
        for path, key in keys:
            seen[path] = key if seen.get(path, key) == key else None
        changed = sorted(p for p, k in seen.items() if k is None)
        if changed:
            _LOG.warning("%d input file(s) changed while this job read them, not recorded as "
                         "labeled (labeled again next time), e.g. %s", len(changed), changed[0])
        labels = output_labels_key(_key(self.output))  # every output file is in place now
        files = read(self.url)
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        for path, key in seen.items():
            if key is not None:
                files[_key(path)] = {"size": key["size"], "mtime": key.get("mtime"), "key": key,
                                     "output": _key(self.output), "labels": labels,
                                     "command": self.command, "labeled_at": stamp}
        storage.write_json(self.url, {"format": FORMAT, "files": dict(sorted(files.items()))})


def record_for(plan, command: str) -> Record | None:
    """The manifest update of a planned job, or None without --skip-labeled; its readers then
    take every file's content key (``reader_keys``)."""
    url = plan.config.skip_labeled
    if not url:
        return None
    return Record(url, plan.config.output, command)


def reader_keys(plan):
    """The function the readers take content keys with (paths -> {path: key}), or None when
    the job keeps no manifest."""
    return file_states if plan.config.skip_labeled else None
