"""Everything torch that is neither Beam nor file I/O: models from their bytes, architectures,
deferral rules, distillation, calibration (``titans.transforms.io.models`` reads and writes
their files)."""
