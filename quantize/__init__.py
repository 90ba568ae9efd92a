"""relaydiff.quantize: INT8 quantization, relay-aware calibration and step distillation (not yet implemented)."""
