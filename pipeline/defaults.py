"""Defaults and names the command line, the launch checks and the commands share.

Plain values only: the command line imports this module to build its parser, which must
not import torch or Beam.
"""
BATCH_SIZE = 65536           # rows per Arrow batch read and per student forward pass
TEACHER_BATCH_SIZE = 16384   # rows per teacher forward pass
SAMPLE_ROWS = 100_000        # rows sampled at launch to check models and set quantile thresholds
DEFERRAL_RATE = 0.2          # share of rows sent to the teacher when no threshold is given
RULE = "margin"              # deferral rule when none is given
MAX_DEAD_LETTER_RATE = 0.1   # above this share of dead-lettered rows the job fails
# TFRecord input: a record whose header declares more bytes is dead-lettered unread (a lying
# header would otherwise be buffered whole); transforms/tfrecord_framing.py has the same
MAX_RECORD_BYTES = 64 << 20
# every deferral rule `titans run` and `titans calibrate` know (titans.models.deferral.RULES
# plus 'learned'); tests/test_deferral.py keeps the two lists equal
RULE_NAMES = ("max_prob", "margin", "entropy", "defer_head", "learned")
# Beam runner when --runner is not given: the in-process runner the DirectRunner would hand
# titans' pipelines to (Prism does not run their exception-handling steps), chosen directly
RUNNER = "FnApiRunner"
