"""relaydiff.quantize: relay-aware calibration and INT8 for the device half (ONNX, CoreML, ExecuTorch).

- ``calibration``: record the device components' inputs along real relays (host [0, k), device [k, N)),
  or along whole device-only trajectories (the baseline);
- ``onnx_int8``: onnxruntime static QDQ (calibrated) and dynamic INT8;
- ``coreml_int8``: coremltools int8 per-channel weights (or 6-bit palettes) and the spec check;
- ``executorch_int8``: PT2E with the XNNPACK quantizer, lowered to XNNPACK;
- ``parity``: an INT8 device half against torch fp32 on held-out relays (denoiser error, final-image PSNR).

Nothing is imported here: each module imports its heavy libraries when called.
"""
