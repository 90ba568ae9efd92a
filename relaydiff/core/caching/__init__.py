"""Budget-aware feature caching of the device UNet (ReCache), the part a device runs.

``split`` splits a UNet pass into a shallow branch and deep features; ``denoiser`` caches them per batch row
(reuse, forecast) for batched evaluation and training; ``budget`` is a budget B and its uniform schedule;
``policy`` is the learned schedule; ``device`` runs one budgeted device half, through a :class:`CachedStep`
that a torch UNet and a bundle's ``unet_step_full``/``unet_step_cached`` artifacts both implement.
Training and evaluation (apps) live in :mod:`relaydiff.cache`. See docs/cache.md.
"""
