"""relaydiff.export: exporters of the device model to ONNX, CoreML and ExecuTorch bundles (not yet implemented; see the bundle issue)."""
