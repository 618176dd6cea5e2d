"""Secure aggregation: the broker learns the sum of the sites' updates, not any one of them.

Pure, IO-free code (no asyncio, zmq, transport, broker or site): ``config`` (a job's settings), ``shamir``
(t-of-n secret sharing), ``prg`` (masks from seeds), ``encoding`` (fixed point in the ring mod 2^bits) and
``protocol`` (the round's state machines, ``SecAggClient`` for a site and ``SecAggServer`` for the broker).
The FedAvg strategy that runs it is ``fedbus.strategy.secure_fedavg``; the site's side is
``fedbus.site.secagg``. Needs the ``cryptography`` package (the ``secagg`` extra).
"""
