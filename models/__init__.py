"""Everything torch that is not Beam: model loading, architectures, deferral rules,
distillation, calibration."""
