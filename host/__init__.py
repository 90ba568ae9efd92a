"""relaydiff.host: the edge controller and split scheduler.

- ``controller``: :class:`HostServer`, serving many devices over the link (runs steps [0, k), hands the
  relay state over, finishes the request itself when the device does not: exactly one result each);
- ``policy``: the :class:`Policy` protocol that picks the relay step k, and :class:`FixedPolicy`;
- ``ledger``: the per-request :class:`Ledger` that records each accepted request's single result.

Import the submodules directly; nothing heavy is imported here.
"""
