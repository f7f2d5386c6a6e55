"""`titans distill`: read the training rows, get the teacher's probabilities, train a student,
save it as TorchScript for `titans run`.

The flags are in ``titans.pipeline.cli.flags``; the training loop in ``titans.models.distill``.
Anything wrong with the inputs is a ValueError that says what to fix, printed as
``titans distill: error: ...`` with exit code 2.
"""
from __future__ import annotations

import argparse

import torch

from titans.models.architectures import parse_hidden
from titans.models.distill import distill, make_student
from titans.models.forward import forward_in_chunks
from titans.transforms.io.models import save_torchscript
from titans.transforms.io.storage import absolute
from titans.pipeline import defaults
from titans.pipeline.cli.console import print_distill_summary
from titans.pipeline.commands.datasets import (data_features, check_labels, check_output_path, read_dataset,
                                      split_rows)
from titans.pipeline.cli.values import model_ref
from titans.pipeline.model_checks import load_checked
from titans.transforms.probs import probs_from_column


def run_distill(args: argparse.Namespace) -> int:
    _distill(args)
    return 0


def _distill(args) -> None:
    _check_distill_args(args)
    check_output_path(args.out, "--out")
    extra = {args.teacher_probs: "--teacher-probs"} if args.teacher_probs else {}
    ds = read_dataset(args.train, data_features(args), args.label_column, extra, args.format)
    if ds.features.dim is None:
        raise ValueError("titans distill trains an MLP student on feature vectors or images; for "
                         "token sequences train a student of your own (titans calibrate and "
                         "titans run take any TorchScript model)")
    print(ds.describe())
    if args.teacher_probs:
        probs = probs_from_column(ds.extra[args.teacher_probs], args.teacher_probs)
    else:
        teacher = load_checked("teacher", model_ref(args, "teacher"), ds.features)
        logits = forward_in_chunks(teacher, ds.x, defaults.BATCH_SIZE)
        probs = torch.softmax(logits, dim=-1).numpy()
        if probs.shape[1] < 2:
            raise ValueError(f"--teacher {args.teacher!r} has {probs.shape[1]} output; a "
                             f"classifier needs at least 2 classes")
    k = probs.shape[1]
    check_labels(ds.labels, k, args.label_column)
    train, val = split_rows(len(ds.x), args.val_fraction, args.seed)
    labels = None if ds.labels is None else ds.labels[train]
    val_labels = None if ds.labels is None else ds.labels[val]
    student = make_student(args.student_arch, ds.features.dim, k, args.method, seed=args.seed)
    history = distill(
        student, ds.x[train], probs[train], labels=labels, method=args.method,
        target_deferral=args.target_deferral, temperature=args.temperature, alpha=args.alpha,
        epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, seed=args.seed,
        val=(ds.x[val], probs[val], val_labels) if len(val) else None, progress=True)
    final = {k_: v for k_, v in history[-1].items() if k_ != "epoch"}
    metadata = {
        "method": args.method, "arch": args.student_arch,
        "feature_columns": list(ds.features.columns), "feature_dim": ds.features.dim,
        "num_classes": k, "outputs": k + (args.method == "defer"),
        "target_deferral": args.target_deferral, "seed": args.seed,
        "teacher": absolute(args.teacher) if args.teacher else f"column {args.teacher_probs}",
        "label_column": args.label_column, "train_rows": len(train), "val_rows": len(val),
        "epochs": args.epochs, "lr": args.lr, "batch_size": args.batch_size,
        "temperature": args.temperature, "alpha": args.alpha, "final": final,
    }
    save_torchscript(student, args.out, metadata)
    print_distill_summary(args, len(train), len(val), k, final)


def _check_distill_args(a) -> None:
    if bool(a.teacher) == bool(a.teacher_probs):
        raise ValueError("give exactly one of --teacher MODEL (run the teacher over the training "
                         "rows) or --teacher-probs COL (its stored probabilities)"
                         + (", not both" if a.teacher else ""))
    if a.teacher_probs and (a.teacher_class or a.teacher_class_kwargs):
        raise ValueError("--teacher-class/--teacher-class-kwargs go with --teacher, not "
                         "--teacher-probs")
    parse_hidden(a.student_arch)  # ValueError with the expected form
    checks = [
        (0.0 <= a.val_fraction < 1.0, f"--val-fraction must be in [0, 1), got {a.val_fraction}"),
        (0.0 <= a.target_deferral <= 1.0,
         f"--target-deferral must be in [0, 1], got {a.target_deferral}"),
        (a.epochs >= 1, f"--epochs must be at least 1, got {a.epochs}"),
        (a.batch_size >= 1, f"--batch-size must be at least 1, got {a.batch_size}"),
        (a.lr > 0, f"--lr must be > 0, got {a.lr}"),
        (a.temperature > 0, f"--temperature must be > 0, got {a.temperature}"),
        (0.0 <= a.alpha <= 1.0, f"--alpha must be in [0, 1], got {a.alpha}"),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(message)
