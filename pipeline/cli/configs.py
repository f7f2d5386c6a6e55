"""Parsed flags -> the JobConfig fields every Beam job command shares (`titans run`,
`teacher-label`, `label`): one reading of the input, format, feature and teacher flags.
Imports nothing heavy at module level (the command line's parser must stay light)."""
from __future__ import annotations

import argparse

from titans.pipeline.cli.values import feature_columns, model_ref


def input_kind(a: argparse.Namespace) -> dict:
    """The format and feature flags as JobConfig fields: input_format, output_format,
    max_record_bytes, and image or tokens specs (titans.transforms.features) when their
    column is given."""
    from titans.transforms.features import ImageSpec, TokenSpec

    kind = {"input_format": a.format, "output_format": a.output_format,
            "max_record_bytes": a.max_record_bytes}
    if a.image_column:
        kind["image"] = ImageSpec(a.image_column, a.image_mode, a.image_size, a.image_mean,
                                  a.image_std)
    if a.token_column:
        kind["tokens"] = TokenSpec(a.token_column, a.pad_id, a.max_length, a.overflow)
    return kind


def job_fields(a: argparse.Namespace) -> dict:
    """The JobConfig fields the flags of every Beam job command give (`titans run`,
    `teacher-label`, `label`); not sample_rows, which means something else to `titans label`."""
    hints = {}
    if a.teacher_accelerator:
        hints["accelerator"] = a.teacher_accelerator
    if a.teacher_min_ram:
        hints["min_ram"] = a.teacher_min_ram
    return dict(
        input=a.input, output=a.output, teacher=model_ref(a, "teacher"),
        feature_columns=feature_columns(a.feature_columns), id_column=a.id_column,
        batch_size=a.batch_size, teacher_batch_size=a.teacher_batch_size,
        column_prefix=a.column_prefix, overwrite=a.overwrite, seed=a.seed,
        teacher_resource_hints=hints, max_dead_letter_rate=a.max_dead_letter_rate,
        skip_labeled=getattr(a, "skip_labeled", None), **input_kind(a))
