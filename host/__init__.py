"""relaydiff.host: the edge controller and split scheduler (not yet implemented; the in-process host half of the
relay is :func:`relaydiff.core.relay.start`)."""
