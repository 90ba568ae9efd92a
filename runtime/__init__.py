"""relaydiff.runtime: the device runtime that accepts relayed latents and finishes them (not yet implemented; the
in-process device half of the relay is :func:`relaydiff.core.relay.resume`)."""
