"""Compression helpers the pruning and quantization passes and users share: calibration
batches, head importance, the evaluation harness, distillation."""
