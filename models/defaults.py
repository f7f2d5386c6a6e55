"""Names and default values of the training side (distillation, Learn then Test).

Plain values only, like ``titans.pipeline.defaults``: the command line builds its parser
from them without importing torch, and ``titans.models.distill`` / ``calibration`` take
their defaults from here, so each value is written once.
"""
METHODS = ("kd", "easy", "defer")        # distillation methods (titans.models.distill)
BOUNDS = ("binomial", "hoeffding_bentkus")  # LTT p-values (titans.models.calibration)
BOUND = "binomial"                       # LTT bound when none is given
DELTA = 0.1                              # LTT: allowed probability that the guarantee fails

# titans distill
STUDENT_ARCH = "16"       # hidden widths of the student MLP
TARGET_DEFERRAL = 0.2     # share of rows the cascade will send to the teacher (easy, defer)
EPOCHS = 30
LR = 1e-2                 # AdamW learning rate
TRAIN_BATCH_SIZE = 64     # rows per training step
TEMPERATURE = 2.0         # softening temperature of kd / easy
ALPHA = 0.5               # weight of cross-entropy on labels in kd / easy
VAL_FRACTION = 0.1        # share of rows held out for validation
