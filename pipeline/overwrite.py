"""``--overwrite``: the job itself replaces the previous run's outputs, at its end.

The launcher deletes nothing. While the new job runs, its files are under temporary names
(``labels/.titans-tmp-RUN/``), and the previous labels, dead letter, report and ``_SUCCESS``
stay where they are, readable: a job that fails before its last step (a GPU quota or
stockout, a runner error, a kill) leaves the previous complete output as it was.

The last step (``stages._Finish``) then, for a job that completed:
  1. ``move_aside``: moves the previous outputs (``_SUCCESS`` first, so readers see an
     incomplete output from that moment; then labels/, dead_letter/, the reports; any
     killed run's temporary files) into ``OUTPUT/_titans_replaced-RUN/``, and marks the move
     done there, so a retried last step does not move the new files;
  2. puts the new files in place, writes report.json, then ``_SUCCESS``;
  3. ``delete_replaced``: deletes ``_titans_replaced-*`` (this run's, and any a run that
     died inside its last step left).
A retry of a last step that had ended finds its own report (``job_run_id``) and ends again
without moving anything.
A job over its dead-letter budget does not replace a previous *complete* output: its files
are dropped and its report goes to ``report.failed.json`` beside the kept one. Over an
output that was not complete (a failed or killed run's), it replaces it like a complete job.

One run at a time per output is the output lock's promise (``output_lock.py``), so nothing
else moves these files meanwhile. Moving is a rename locally and a copy-and-delete per object
on gs://, done in parallel.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

from titans.pipeline.outputs import OUTPUTS, SUCCESS
from titans.transforms.io import storage

ASIDE = "_titans_replaced-"          # + the run id: the previous outputs, until _SUCCESS
MOVED = "_titans_moved"              # in the aside directory: the move is complete
FAILED_REPORT = "report.failed.json"  # a failed run's report beside a kept complete output
REPLACED = (*OUTPUTS, FAILED_REPORT)  # what a new run replaces (top-level names)


def aside_dir(output: str, run: str) -> str:
    return storage.join(output, ASIDE + run)


def previous_complete(output: str) -> bool:
    return storage.exists(storage.join(output, SUCCESS))


def _relative(output: str, path: str) -> str:
    return path[len(output.rstrip("/")) + 1:].replace("\\", "/")


def move_aside(output: str, run: str, keep: list[str]) -> int:
    """Move the previous outputs into this run's aside directory, ``_SUCCESS`` first; files
    under ``keep`` (this run's temporary directories) stay. Idempotent: a retried last step
    finds the move marked done and moves nothing. Returns how many files were moved."""
    aside = aside_dir(output, run)
    if storage.exists(storage.join(aside, MOVED)):
        return 0
    keep = [k.rstrip("/") + "/" for k in keep]
    paths = [p for p in storage.list_under(output)
             if _relative(output, p).split("/", 1)[0] in REPLACED
             and not any(p.replace("\\", "/").startswith(k.replace("\\", "/")) for k in keep)]
    paths.sort(key=lambda p: _relative(output, p) != SUCCESS)  # _SUCCESS first

    def move(path: str) -> None:
        target = storage.join(aside, _relative(output, path))
        if not storage.is_url(path):
            os.makedirs(os.path.dirname(target), exist_ok=True)
        storage.rename(path, target)

    if paths:
        move(paths[0])
        if len(paths) > 1:
            with ThreadPoolExecutor(min(16, len(paths) - 1)) as pool:  # an object store copies
                list(pool.map(move, paths[1:]))
    if not storage.is_url(output):
        _remove_empty_dirs(output, paths)
        os.makedirs(aside, exist_ok=True)  # also when there was nothing to move
    storage.write_bytes(storage.join(aside, MOVED), b"")
    return len(paths)


def _remove_empty_dirs(output: str, moved: list[str]) -> None:
    """Locally: the directories a move emptied (a killed run's temporary directory)."""
    top = {storage.join(output, name) for name in REPLACED}
    for d in sorted({os.path.dirname(p) for p in moved}, key=len, reverse=True):
        while d not in top and d.startswith(output) and d != output.rstrip("/"):
            try:
                os.rmdir(d)
            except OSError:
                break
            d = os.path.dirname(d)


def delete_replaced(output: str) -> None:
    """Delete every aside directory in ``output``: called once ``_SUCCESS`` is written."""
    names = {_relative(output, p).split("/", 1)[0] for p in storage.list_under(output)}
    for name in sorted(n for n in names if n.startswith(ASIDE)):
        storage.delete_under(storage.join(output, name))
