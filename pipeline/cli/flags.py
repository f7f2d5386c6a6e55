"""Every flag of the `titans` command line, and the parser built from them.

Light on purpose: `titans --help` and parsing any command import argparse and the two
defaults modules, never torch, Beam, pyarrow or numpy. The commands import what they need
once the flags are parsed (``titans.pipeline.cli.main``).
"""
from __future__ import annotations

import argparse

from titans.models import defaults as train_defaults
from titans.pipeline.cli import values
from titans.pipeline import defaults
from titans.pipeline.label import defaults as label_defaults

IN_MEMORY_NOTE = ("The data is read into memory with pyarrow: fine for the millions of rows a "
                  "student needs; labeling a dataset at scale is done by `titans teacher-label` "
                  "and `titans run`.")
# commands whose unknown flags are Beam pipeline options; the others parse strictly
BEAM_COMMANDS = ("run", "teacher-label", "label", "demo")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="titans", allow_abbrev=False,
        description="Batch model cascades for offline labeling: a small student labels the "
                    "easy rows, a large teacher only the hard ones.")
    parser.add_argument("--log-level", default="INFO",
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                        help="log level of titans' own messages (default: %(default)s)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_run_parser(sub)
    add_teacher_label_parser(sub)
    add_distill_parser(sub)
    add_calibrate_parser(sub)
    add_label_parser(sub)
    add_demo_parser(sub)
    add_state_parser(sub)
    return parser


# =========================================================================== shared pieces

def add_model_flags(p: argparse.ArgumentParser, role: str, required: bool = True) -> None:
    p.add_argument(f"--{role}", required=required, metavar="MODEL",
                   help=f"the {role} model: path or URL (gs://...) of a TorchScript file "
                        f"(torch.jit.save), a torch.export program (.pt2), or a state_dict "
                        f"with --{role}-class. forward: float32 [batch, features] -> logits "
                        f"[batch, classes]")
    p.add_argument(f"--{role}-class", metavar="MODULE:CLASS",
                   help=f"class to build the {role} from when MODEL is a state_dict")
    p.add_argument(f"--{role}-class-kwargs", metavar="JSON",
                   help=f"constructor arguments of --{role}-class as a JSON object, "
                        f"e.g. '{{\"in_features\": 64, \"out_features\": 10}}'")


def add_trust_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trust-model-code", action="store_true",
                   help="allow model files that can run code when loaded: a torch.export "
                        "archive with pickled members can run arbitrary code on this machine "
                        "(and on every worker) when it is loaded. Only for files you trust; "
                        "off by default")








def _feature_columns_flag(p: argparse.ArgumentParser, extra: str = "") -> None:
    p.add_argument("--feature-columns", default="features", metavar="COL[,COL...]",
                   help="one vector column (list or fixed-size list of numbers) or several "
                        "numeric columns concatenated in order (default: %(default)s)" + extra)


def _format_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--format", default="auto", choices=("auto", "parquet", "tfrecord"),
                   help="input format; auto = by file name (.parquet; .tfrecord, .tfrecords, "
                        ".tfr, each optionally .gz), then by content (default: %(default)s)")
    p.add_argument("--output-format", default="parquet", choices=("parquet", "tfrecord"),
                   help="format of labels/: Parquet, or TFRecord of tf.train.Example with every "
                        "input column and the added ones as features (the dead letter stays "
                        "Parquet) (default: %(default)s)")




def _tfrecord_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-record-bytes", type=values.byte_size, default=defaults.MAX_RECORD_BYTES,
                   metavar="SIZE",
                   help="TFRecord input: the largest record read. A header declaring more is "
                        "taken as damage, checked before any of the record is read: its bytes "
                        "up to the next valid record go to the dead letter (with their byte "
                        "range) and reading goes on from there, so a lying header can neither "
                        "exhaust memory nor hide the records after it. Bytes, or KiB/MiB/GiB "
                        "(default: %(default)s, 64 MiB)")






def _image_and_token_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("images (instead of --feature-columns)")
    g.add_argument("--image-column", metavar="COL",
                   help="column of encoded PNG/JPEG images (Parquet binary, or a bytes_list "
                        "feature), decoded on a thread pool into float32 [batch, C, H, W] in "
                        "[0, 1]; an image that does not decode goes to the dead letter")
    g.add_argument("--image-mode", default="RGB", choices=("RGB", "L"),
                   help="convert every image to RGB (C=3) or L, grayscale (C=1) "
                        "(default: %(default)s)")
    g.add_argument("--image-size", type=values.dims, metavar="H,W",
                   help="resize every image to H,W (bilinear); without it every image must "
                        "have the size of the sampled ones (default: no resizing)")
    g.add_argument("--image-mean", type=values.floats, metavar="M[,M,M]",
                   help="per-channel mean subtracted after scaling to [0, 1] (default: 0)")
    g.add_argument("--image-std", type=values.floats, metavar="S[,S,S]",
                   help="per-channel standard deviation divided by after the mean (default: 1)")
    g = p.add_argument_group("token sequences (instead of --feature-columns)")
    g.add_argument("--token-column", metavar="COL",
                   help="column of token ids (a list of integers, or an int64_list feature): "
                        "int64 [batch, L], padded to the batch's longest row")
    g.add_argument("--pad-id", type=int, default=0, metavar="ID",
                   help="token id that pads shorter rows (default: %(default)s)")
    g.add_argument("--max-length", type=int, metavar="L",
                   help="longest sequence passed to the models (default: no limit)")
    g.add_argument("--overflow", default="dead_letter", choices=("dead_letter", "truncate"),
                   help="a row longer than --max-length goes to the dead letter or is cut "
                        "(default: %(default)s)")


def _seed_flag(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--seed", type=int, default=0, help=f"seeds {what} (default: %(default)s)")


# =========================================================================== run, teacher-label

def _add_input_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input", required=True, metavar="PATTERN",
                   help="Parquet or TFRecord (tf.train.Example) file, directory (its *.parquet "
                        "or *.tfrecord/*.tfrecords/*.tfr[.gz] files) or glob; local or a URL of "
                        "a Beam filesystem, such as gs://bucket/data/*.parquet")
    p.add_argument("--output", required=True, metavar="DIR",
                   help="output directory (local or URL): labels/ (Parquet or TFRecord shards), "
                        "dead_letter/ (rows that could not be labeled, with the reason), "
                        "report.json and report.png, then _SUCCESS, written last")
    _format_flags(p)
    _feature_columns_flag(p)
    _image_and_token_flags(p)
    p.add_argument("--id-column", metavar="COL",
                   help="column that identifies a row; checked to exist (every input column "
                        "is passed through to the output anyway)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a previous run's outputs in a non-empty --output directory")
    p.add_argument("--batch-size", type=int, default=defaults.BATCH_SIZE, metavar="N",
                   help="rows per Arrow batch read from Parquet and per student forward pass, "
                        "whatever the files' row-group size (default: %(default)s)")
    p.add_argument("--max-dead-letter-rate", type=values.share, default=defaults.MAX_DEAD_LETTER_RATE,
                   metavar="R",
                   help="the job exits non-zero (report still written) when more than this "
                        "share of input rows is dead-lettered: that usually means a wrong flag, "
                        "not bad data (default: %(default)s)")


def _add_teacher_stage_flags(p: argparse.ArgumentParser, sample_rows: bool = True) -> None:
    p.add_argument("--teacher-batch-size", type=int, default=defaults.TEACHER_BATCH_SIZE,
                   metavar="N",
                   help="rows per teacher forward pass; hard rows from several batches are "
                        "merged up to this size (default: %(default)s)")
    p.add_argument("--teacher-device", default="auto", metavar="DEVICE",
                   help="cpu, cuda or auto = cuda when the worker has a GPU; asking for cuda "
                        "on a worker without one fails rather than silently using the CPU "
                        "(default: %(default)s)")
    p.add_argument("--teacher-accelerator", metavar="HINT",
                   help="Beam resource hint for the teacher stage only, e.g. "
                        "'type:nvidia-l4;count:1;machine_type:g2-standard-4;"
                        "install-nvidia-driver' on Dataflow, where a GPU on a machine type "
                        "that cannot carry it is refused at launch; no effect on local runners")
    p.add_argument("--teacher-min-ram", metavar="SIZE",
                   help="Beam min_ram resource hint for the teacher stage, e.g. 16GB")
    p.add_argument("--column-prefix", default="", metavar="PREFIX",
                   help="prefix for the columns titans adds (label, confidence, ...), for an "
                        "input that already has a column of that name (default: none)")
    if sample_rows:  # `titans label` has a --sample-rows of its own
        p.add_argument("--sample-rows", type=int, default=defaults.SAMPLE_ROWS, metavar="N",
                       help="rows sampled (from up to 32 random row groups) before the "
                            "pipeline starts, to check the models on real rows and to set the "
                            "threshold for --deferral-rate (default: %(default)s; with --image-column, "
                            "10%% of the input's rows, between 1,000 and 10,000)")
    _seed_flag(p, "the sample and --audit-rate")


def _add_job_mode_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--skip-labeled", metavar="MANIFEST",
                   help="incremental labeling: leave out the input files this manifest (JSON, "
                        "local or gs://) lists with the same size and modification time, and "
                        "add this job's files to it once the job completes (after _SUCCESS). "
                        "A listed file that changed is labeled again; when every file is "
                        "listed, the command exits 0 without starting a job")
    p.add_argument("--describe", action="store_true",
                   help="run the launch checks and build the pipeline, then print it as JSON "
                        "(stages in order with their resource hints, batch sizes and devices, "
                        "and the resolved plan) instead of running it; writes and deletes "
                        "nothing")


def add_run_parser(sub) -> argparse.ArgumentParser:
    run = sub.add_parser(
        "run", allow_abbrev=False, help="label a Parquet dataset with the cascade",
        description="Label every row of a Parquet dataset: the student scores all rows, rows "
                    "whose deferral score is above the threshold go to the teacher. Flags not "
                    f"listed below are Beam pipeline options (default --runner "
                    f"{defaults.RUNNER}: Beam's in-process runner, which the DirectRunner "
                    f"would pick for it).")
    _add_input_flags(run)
    _tfrecord_flags(run)
    add_model_flags(run, "student")
    add_model_flags(run, "teacher")
    add_trust_flag(run)
    run.add_argument("--rule", choices=defaults.RULE_NAMES,
                     help="deferral score, higher = harder: max_prob = 1 - max p; margin = "
                          "1 - (p1 - p2); entropy = H(p)/log K; defer_head = p(defer) of a "
                          "`titans distill --method defer` student; learned = a post-hoc model, "
                          f"see --deferral-model (default: {defaults.RULE})")
    how = run.add_mutually_exclusive_group()
    how.add_argument("--threshold", type=float, metavar="T",
                     help="send a row to the teacher when its deferral score > T")
    how.add_argument("--deferral-rate", type=float, metavar="R",
                     help="share of rows to send to the teacher (0-1); the threshold is the "
                          "(1-R) quantile of student scores on a sample of the input "
                          f"(--sample-rows). Default when no --threshold: {defaults.DEFERRAL_RATE}")
    how.add_argument("--calibration", metavar="CAL.json",
                     help="rule and threshold chosen by `titans calibrate` (for a budget or "
                          "with an accuracy guarantee); replaces --rule/--threshold/"
                          "--deferral-rate/--deferral-model")
    run.add_argument("--deferral-model", metavar="PATH",
                     help="trained post-hoc deferral model for --rule learned (written by "
                          "`titans calibrate`)")
    run.add_argument("--audit-rate", type=float, default=0.0, metavar="A",
                     help="also send a seeded random share A of the easy rows to the teacher; "
                          "their labels stay the student's, and the report gives the "
                          "student-teacher agreement on them with a 95%% confidence interval "
                          "(default: %(default)s, no audit)")
    run.add_argument("--student-device", default="cpu", metavar="DEVICE",
                     help="cpu, cuda or auto (default: %(default)s)")
    _add_teacher_stage_flags(run)
    _add_job_mode_flags(run)
    return run


def add_teacher_label_parser(sub) -> argparse.ArgumentParser:
    label = sub.add_parser(
        "teacher-label", allow_abbrev=False,
        help="label every row with the teacher, writing its class probabilities",
        description="The same Beam pipeline with the teacher on every row: writes label, "
                    "confidence and teacher_probs (all K probabilities) next to every input "
                    "column, so a student can be distilled (`titans distill --teacher-probs "
                    "teacher_probs`) from unlabeled data at scale. Flags not listed below are "
                    "Beam pipeline options.")
    _add_input_flags(label)
    _tfrecord_flags(label)
    add_model_flags(label, "teacher")
    add_trust_flag(label)
    _add_teacher_stage_flags(label)
    _add_job_mode_flags(label)
    return label


# =========================================================================== distill, calibrate

def _data_flags(p: argparse.ArgumentParser, flag: str, what: str) -> None:
    p.add_argument(flag, required=True, metavar="PATTERN",
                   help=f"the {what}: Parquet or TFRecord file, directory or glob; local or a URL "
                        f"such as gs://bucket/data/*.parquet. Files are conformed to one schema "
                        f"unified from all of them, as in `titans run`")
    p.add_argument("--format", default="auto", choices=("auto", "parquet", "tfrecord"),
                   help="input format; auto = by file name, then by content (default: %(default)s)")
    _feature_columns_flag(p, "; rows with a null, NaN or wrong-length feature vector are dropped "
                             "and counted")
    _image_and_token_flags(p)
    p.add_argument("--label-column", metavar="COL",
                   help="integer class ids 0..K-1 in the teacher's class order (optional); rows "
                        "with a null label are dropped")


def add_distill_parser(sub) -> argparse.ArgumentParser:
    d = train_defaults
    p = sub.add_parser(
        "distill", allow_abbrev=False,
        help="train a small student from a teacher (its model or its stored probabilities)",
        description="Distill a student MLP from a teacher's probabilities and save it as "
                    "TorchScript for `titans run`. Give exactly one of --teacher (run it over the "
                    "training rows) or --teacher-probs (a column of K probabilities per row, as "
                    "`titans teacher-label` writes it). A seeded --val-fraction of the rows is held "
                    "out for the per-epoch validation line. " + IN_MEMORY_NOTE)
    _data_flags(p, "--train", "training set")
    add_model_flags(p, "teacher", required=False)
    add_trust_flag(p)
    p.add_argument("--teacher-probs", metavar="COL",
                   help="column holding the teacher's class probabilities (list of K floats per "
                        "row, e.g. teacher_probs from `titans teacher-label`), instead of --teacher")
    p.add_argument("--out", required=True, metavar="STUDENT.pt",
                   help="where to save the student (TorchScript; local path or URL)")
    p.add_argument("--method", required=True, choices=d.METHODS,
                   help="kd: Hinton distillation; easy: kd that down-weights the share "
                        "--target-deferral of rows the cascade sends to the teacher anyway; "
                        "defer: K+1 outputs, the last means 'ask the teacher' (use it with "
                        "--rule defer_head)")
    p.add_argument("--student-arch", default=d.STUDENT_ARCH, metavar="WIDTHS",
                   help="hidden layer widths of the student MLP, e.g. 64,64, or 'linear' "
                        "(default: %(default)s)")
    p.add_argument("--target-deferral", type=float, default=d.TARGET_DEFERRAL, metavar="R",
                   help="share of rows the cascade will send to the teacher, used by easy and "
                        "defer (default: %(default)s)")
    p.add_argument("--epochs", type=int, default=d.EPOCHS, metavar="N",
                   help="passes over the training rows (default: %(default)s)")
    p.add_argument("--lr", type=float, default=d.LR, help="AdamW learning rate (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=d.TRAIN_BATCH_SIZE, metavar="N",
                   help="rows per training step (default: %(default)s)")
    p.add_argument("--temperature", type=float, default=d.TEMPERATURE, metavar="T",
                   help="softening temperature of kd/easy (default: %(default)s)")
    p.add_argument("--alpha", type=float, default=d.ALPHA,
                   help="weight of cross-entropy on --label-column in kd/easy; the rest is the "
                        "distillation term; unused without labels (default: %(default)s)")
    p.add_argument("--val-fraction", type=float, default=d.VAL_FRACTION, metavar="F",
                   help="share of rows held out for validation, seeded (default: %(default)s)")
    _seed_flag(p, "the split, the initialisation and the shuffles: the same seed and data give "
                  "identical weights")
    return p


def add_calibrate_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "calibrate", allow_abbrev=False,
        help="choose the deferral rule and threshold on a labeled or unlabeled calibration set",
        description="Run the student and the teacher on a calibration set, compare every "
                    "deferral rule (accuracy vs deferral curves), and write the chosen rule and "
                    "threshold to CAL.json for `titans run`. The rows are split in two seeded "
                    "random halves: the `learned` rule is fitted on one half (saved as "
                    "<CAL stem>.learned.json), and every rule's curve and threshold is computed "
                    "on the other, so the rules are compared on the same rows and the LTT "
                    "guarantee holds (n_fit_rows / n_calibration_rows in CAL.json). A student "
                    "with K+1 outputs (--method defer) has no learned rule and uses every row. "
                    "Without --label-column, accuracy means agreement with the teacher. "
                    + IN_MEMORY_NOTE)
    _data_flags(p, "--input", "calibration set (rows like those the cascade will label)")
    add_model_flags(p, "student")
    add_model_flags(p, "teacher")
    add_trust_flag(p)
    p.add_argument("--out", required=True, metavar="CAL.json",
                   help="calibration file to write. Local paths inside it (student, teacher, "
                        "deferral_model) are made absolute, so `titans run --calibration` works "
                        "from any directory; URLs are kept as given")
    p.add_argument("--rule", choices=defaults.RULE_NAMES,
                   help=f"the operating rule (default: {defaults.RULE}, or defer_head for a "
                        f"student with K+1 outputs, which only defer_head can run); learned is "
                        f"skipped, with a note, when the student is never or always wrong on the "
                        f"fitting half")
    p.add_argument("--plot", metavar="CURVE.png",
                   help="plot every rule's curve with the operating point (PNG or SVG)")
    how = p.add_mutually_exclusive_group()
    how.add_argument("--deferral-rate", type=float, metavar="R",
                     help="budget: the threshold sends this share of the held-out rows to the "
                          "teacher; no accuracy guarantee")
    how.add_argument("--max-accuracy-loss", type=float, metavar="EPS",
                     help="Learn then Test: the cheapest threshold whose accuracy loss against "
                          "the teacher is <= EPS with probability >= 1 - --delta (against the "
                          "teacher's answers when there are no labels)")
    how.add_argument("--target-accuracy", type=float, metavar="A",
                     help="Learn then Test: the cheapest threshold whose cascade accuracy is >= A "
                          "with probability >= 1 - --delta; needs --label-column")
    p.add_argument("--delta", type=float, metavar="D",
                   help="LTT: allowed probability that the guarantee fails "
                        f"(default: {train_defaults.DELTA})")
    p.add_argument("--bound", choices=train_defaults.BOUNDS,
                   help="LTT: p-values from the exact binomial tail or Hoeffding-Bentkus "
                        f"(default: {train_defaults.BOUND})")
    _seed_flag(p, "the split into halves and the learned rule's fit")
    return p


# =========================================================================== label

def add_label_parser(sub) -> argparse.ArgumentParser:
    ld = label_defaults
    p = sub.add_parser(
        "label", allow_abbrev=False,
        help="from a teacher and unlabeled data to labels with a guarantee, in one command",
        description="The teacher labels a seeded random sample of the input; a student within "
                    "--student-budget is distilled from it and calibrated on a held-out part of "
                    "it with Learn then Test against the teacher's labels; the cascade labels "
                    "every other row, and the sample rows keep the teacher's labels (the teacher "
                    "never labels a row twice). DIR gets labels/, dead_letter/, student.pt, "
                    "calibration.json (reusable with `titans run --calibration`), report.json "
                    "and report.png covering the whole job, and _label/ with each phase's "
                    "artifacts for --resume. Flags not listed below are Beam pipeline options.")
    _add_input_flags(p)
    _tfrecord_flags(p)
    add_model_flags(p, "teacher")
    add_trust_flag(p)
    how = p.add_mutually_exclusive_group()
    how.add_argument("--max-disagreement", type=float, metavar="EPS",
                     help="the guarantee: with probability >= 1 - --delta, at most this share "
                          "of the rows outside the sample get a label other than the teacher's "
                          f"(default: {ld.MAX_DISAGREEMENT} unless --deferral-rate is given)")
    how.add_argument("--deferral-rate", type=float, metavar="R",
                     help="instead of a guarantee, a budget: send this share of the rows "
                          "outside the sample to the teacher")
    p.add_argument("--delta", type=float, metavar="D",
                   help="allowed probability that the guarantee fails, over the draw of the "
                        f"sample (default: {train_defaults.DELTA})")
    p.add_argument("--student-budget", type=float, default=ld.STUDENT_BUDGET, metavar="F",
                   help="the student's compute per row (FLOPs, counted on a forward pass) as "
                        "a share of the teacher's; MLP students within it are distilled and "
                        "the one that makes the cascade cheapest on validation rows is kept "
                        "(default: %(default)s)")
    p.add_argument("--sample-rows", type=int, metavar="N",
                   help="rows the teacher labels to train and calibrate the student, drawn at "
                        "random over every input file (default: "
                        + ld.SAMPLE_RULE.replace("%", "%%") + "; a warm --state run: the size "
                        "with the fewest expected teacher rows in all)")
    p.add_argument("--rule", choices=("max_prob", "margin", "entropy"),
                   help="deferral rule (default: the one that needs the fewest teacher rows on "
                        "the validation part of the sample)")
    p.add_argument("--audit-rate", type=values.share, default=ld.AUDIT_RATE, metavar="A",
                   help="also send a seeded random share A of the easy rows to the teacher; the "
                        "report estimates the disagreement over the rows outside the sample from "
                        "them, a live check of the guarantee (default: %(default)s)")
    p.add_argument("--student-device", default="cpu", metavar="DEVICE",
                   help="cpu, cuda or auto for the student in the cascade (default: %(default)s)")
    p.add_argument("--resume", action="store_true",
                   help="continue a job in DIR that stopped in a later phase: phases whose "
                        "artifacts are in DIR/_label with the same settings are reused, so no "
                        "sample row is labeled by the teacher again")
    p.add_argument("--state", metavar="STATE_DIR",
                   help="keep learning across scheduled runs (local path or gs://): the first "
                        "run with an empty STATE_DIR is a plain titans label run, later ones "
                        "warm-start yesterday's student, fine-tune it on a pool of teacher-"
                        "labelled rows plus a smaller fresh sample of today's rows (sized for "
                        "the fewest expected teacher rows, predicted from yesterday's student), "
                        "and calibrate on today's rows only, so the guarantee holds every run. "
                        "The pool COPIES INPUT ROWS (their model columns) into STATE_DIR; a "
                        "generation is committed only after the run's _SUCCESS")
    p.add_argument("--state-pool-rows", type=int, default=ld.STATE_POOL_ROWS, metavar="N",
                   help="most teacher-labelled rows kept in --state's pool (recent runs first, "
                        "every run represented); 0 keeps no input rows: the next run warm-"
                        "starts from the student alone (default: %(default)s)")
    p.add_argument("--state-reset", action="store_true",
                   help="start --state over: this run is a cold start and, once it succeeds, "
                        "its generation replaces the state (e.g. a new teacher or schema)")
    _add_teacher_stage_flags(p, sample_rows=False)
    return p


# =========================================================================== demo

def add_demo_parser(sub) -> argparse.ArgumentParser:
    demo = sub.add_parser(
        "demo", allow_abbrev=False,
        help="train a student and a teacher on scikit-learn's digits and run the cascade",
        description="Builds a real dataset from scikit-learn's bundled handwritten digits, "
                    "trains a small student and a larger teacher (seconds on a CPU), saves "
                    "them as TorchScript and runs the same cascade as `titans run` on the "
                    "test split. Extra flags are Beam pipeline options.")
    demo.add_argument("--output", default="titans-demo-output", metavar="DIR",
                      help="where to write data, models and the run (default: %(default)s); "
                           "replaced if it holds a previous demo")
    demo.add_argument("--deferral-rate", type=float, default=defaults.DEFERRAL_RATE, metavar="R",
                      help="share of test rows sent to the teacher (default: %(default)s)")
    _seed_flag(demo, "the split and the training")
    demo.add_argument("--format", default="parquet", choices=("parquet", "tfrecord"),
                      help="write the digits as Parquet or as TFRecord files of tf.train.Example "
                           "(pixels a float_list, id and y int64_list) and label them from there "
                           "(default: %(default)s)")
    return demo


# =========================================================================== state

def add_state_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "state", allow_abbrev=False,
        help="print a `titans label --state` directory's history and draw its history.png",
        description="Checks the current generation of a --state directory (every file against "
                    "its recorded SHA-256), prints its student, teacher, pool and lineage and "
                    "the per-run history as a table (rows, teacher rows by kind, teacher's "
                    "share, threshold, fresh-sample agreement, drift), and writes DIR/"
                    "history.png. Takes no lock and changes nothing else.")
    p.add_argument("dir", metavar="DIR", help="the --state directory (local path or gs://)")
    return p
