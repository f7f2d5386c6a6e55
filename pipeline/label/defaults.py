"""Defaults of `titans label`. Plain values only: the command line builds its parser from
them without importing torch or Beam (like ``titans.pipeline.defaults``)."""
MAX_DISAGREEMENT = 0.01   # EPS: share of cascade rows whose label may differ from the teacher's
STUDENT_BUDGET = 0.1      # F: student FLOPs per row as a share of the teacher's
AUDIT_RATE = 0.01         # share of easy rows the teacher also labels, as a live check
# --sample-rows when not given: min(SAMPLE_MAX, max(SAMPLE_MIN, SAMPLE_SHARE x rows)), and at
# most half the rows
SAMPLE_MAX = 100_000
SAMPLE_MIN = 5_000
SAMPLE_SHARE = 0.02
SAMPLE_RULE = "min(100000, max(5000, 2% of the rows)), at most half the rows"
STATE_POOL_ROWS = 20_000  # --state: teacher-labelled rows kept in the pool
