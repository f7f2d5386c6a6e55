"""The names of what a run writes into its output directory; ``--overwrite`` removes exactly
these. Plain values, in a module that imports nothing, so that whatever needs them (the
stages that write them, the launcher, the manifest that checks an output) imports them one way.
"""
LABELS, DEAD_LETTER, REPORT, PLOT, SUCCESS = "labels", "dead_letter", "report.json", "report.png", "_SUCCESS"
OUTPUTS = (LABELS, DEAD_LETTER, REPORT, PLOT, SUCCESS)
