"""How a job that ran ends in failure, as exceptions (imports nothing: the command line
catches them without loading Beam).

* ``JobFailed``: the job's last step raises it *after* writing report.json with status
  failed (over the dead-letter budget), so that the job fails on every runner -- Dataflow
  marks it failed and an Airflow task waiting for it goes red -- instead of ending as done.
  Its text names the report, since a remote runner hands the launcher only the text.
* ``JobError``: what the launcher raises when the runner gave up on the job (a JobFailed
  without a readable report, or an error the runner's retries did not get past: a lost model
  server, a CUDA error, a model failing on every row). One line; the command prints it and
  exits 1.
"""
from __future__ import annotations

import re

MARK = "titans job failed:"  # starts JobFailed's text, so it is found in a runner's error text


class JobFailed(Exception):
    """Raised by the job's last step once its failed report is written at ``report_path``."""

    def __init__(self, status: str, report_path: str):
        super().__init__(f"{MARK} {status} (report: <{report_path}>)")  # <>: a path may hold spaces
        self.status, self.report_path = status, report_path


def failed_report_path(error: BaseException) -> str | None:
    """The report a JobFailed named, from the exception itself or from the text a runner made
    of it (a worker's traceback in a RuntimeError, a Dataflow job's error messages)."""
    if isinstance(error, JobFailed):
        return error.report_path
    found = re.search(re.escape(MARK) + r".*?\(report: <(.+?)>\)", str(error), re.S)
    return found.group(1) if found else None


class JobError(Exception):
    """The job ran and failed; one line, printed as ``titans COMMAND: job failed: ...``."""


def one_line(error: BaseException, limit: int = 400) -> str:
    """``Type: first line`` of ``error`` (a runner's error may carry a whole traceback)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    # Beam re-raises a step's error with "[while running 'STEP']" appended: keep it, it says where
    text = lines[0] if lines else ""
    if len(lines) > 1:  # a traceback's last line is the error itself
        last = next((line for line in reversed(lines) if re.match(r"^[\w.]+(Error|Exception|"
                                                                  r"Failed|Interrupt)\b", line)),
                    None)
        text = last or text
    name = type(error).__name__
    text = text if text.startswith(name) or ":" in text.split(" ", 1)[0] else f"{name}: {text}"
    return text if len(text) <= limit else text[:limit - 3] + "..."
