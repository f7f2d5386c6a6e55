"""Python's cyclic garbage collector around a command's start-up.

Start-up allocates millions of objects that live as long as the process (torch, Beam, the
pipeline graph), and the collector scanned them all in ~5 full collections, ~0.4 s of a
1M-row run (measured with ``gc.callbacks``). The `titans` command pauses the collector
first thing; ``run_job`` resumes it before the job runs, after freezing what start-up made
(those objects are never garbage, and later collections skip them), so a long job still
collects its own garbage. Only a pause made here is resumed: a program that calls titans
as a library keeps its own collector settings.
"""
from __future__ import annotations

import gc

_paused = False


def pause() -> None:
    global _paused
    if gc.isenabled():
        gc.disable()
        _paused = True


def resume() -> None:
    global _paused
    if _paused:
        _paused = False
        gc.freeze()
        gc.enable()
