"""Beam's PipelineOptions for a titans job, in one place for the commands that build them.

Its own module so that ``job`` (which runs a job) and ``describe`` (which writes a job's
graph without running it, and which ``job`` calls) both import it, one way.
"""
from __future__ import annotations

from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

from titans.pipeline import defaults


def pipeline_options(beam_args: list[str]) -> PipelineOptions:
    options = PipelineOptions(beam_args)
    if not options.view_as(StandardOptions).runner:
        # not "DirectRunner": its checks before it picks this same runner (two passes over
        # the graph, importing Pub/Sub) cost ~0.15 s a run
        options.view_as(StandardOptions).runner = defaults.RUNNER
    return options
