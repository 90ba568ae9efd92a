"""Budget-aware feature caching for the device UNet (ReCache): mechanisms, schedules, training and evaluation.

``unet`` splits a UNet pass into a shallow branch and deep features; ``denoiser`` caches them (reuse,
forecast); ``run`` is the cached device half; ``schedules`` spend a budget B (uniform, heuristic);
``policy`` and ``train`` are the learned schedule; ``evaluate`` is ``relaydiff eval cache``. See docs/cache.md.
"""
