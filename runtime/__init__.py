"""relaydiff.runtime: the device runtime that accepts relayed latents and finishes them.

- ``backends``: the :class:`Backend` protocol and its registry (``torch`` is the reference backend;
  ``onnx`` / ``executorch`` run a built bundle's artifacts);
- ``device``: :class:`DeviceRuntime` (finish a relayed state, or generate alone, and describe the device);
- ``client``: :class:`DeviceClient`, the device's side of the link (falls back to device-only generation);
- ``safety``: the bundle's safety checker and the prompt denylist (docs/bundle.md, "Safety");
- ``settings``: :class:`GenerationSettings`, the fixed part of a request (steps, sampler, guidance, seed).

Import the submodules directly; nothing heavy is imported here.
"""
