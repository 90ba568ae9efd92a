"""relaydiff: split text-to-image diffusion between an edge host model and a device model.

The host runs the first denoising steps of a shared-latent model family and hands the
intermediate latent over (a :class:`relaydiff.core.state.RelayState`); the device finishes
the trajectory and decodes the image (the RISE relay).

Layout: ``relaydiff.core`` holds what host and device share (family loading, schedulers,
the relay state and loop); ``relaydiff.host``, ``relaydiff.runtime``, ``relaydiff.export``
and ``relaydiff.quantize`` are the top-level folders ``host/``, ``runtime/``, ``export/``
and ``quantize/``. Nothing heavy is imported here.
"""

__version__ = "0.1.0"
