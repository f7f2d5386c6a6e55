"""`titans state DIR`: what a `titans label --state DIR` directory holds, at a glance.

Prints the current generation (its student, teacher, pool and lineage) and the per-run
history as a table, and writes or updates DIR/history.png. Reads the state with the same
checks as a label run (a damaged file is one line naming it, exit code 2); takes no lock and
writes nothing but history.png.
"""
from __future__ import annotations

import argparse

from titans.pipeline.state import history
from titans.pipeline.state.store import PLOT, StateDir
from titans.transforms.io import storage


def describe(state) -> str:
    """The current generation in a few lines."""
    m = state.meta
    student, teacher, pool = m.get("student", {}), m.get("teacher", {}), m.get("pool", {})
    chain = " <- ".join(f"{e.get('student_sha256', '')[:8]} ({e.get('kept')})"
                        for e in reversed(m.get("lineage", [])[-5:]))
    return "\n".join([
        f"state {state.root}: generation {state.generation} ({state.folder}), created "
        f"{m.get('created')}, state_version {m.get('state_version')}",
        f"  teacher: {teacher.get('path')} (sha256 {str(teacher.get('sha256'))[:12]}...)",
        f"  student: {state.student_path} (sha256 {str(student.get('sha256'))[:12]}..., "
        f"{student.get('arch')})",
        f"  pool: {pool.get('rows', 0):,} rows from {pool.get('runs', 0)} run(s), cap "
        f"{pool.get('cap')}" + (f", {state.pool_path}" if state.pool_path else ""),
        f"  lineage (newest first): {chain}",
    ])


def run_state(args: argparse.Namespace) -> int:
    state = StateDir(args.dir).current()
    if state is None:
        raise ValueError(f"{args.dir!r} holds no state yet (no current.json): a first "
                         f"`titans label --state {args.dir}` run writes one")
    print(describe(state))
    print()
    print(history.table(state.history))
    plot = storage.join(state.root, PLOT)
    history.plot(state.history, plot)
    print(f"\nwrote {plot}")
    return 0
