"""The Client API's configuration names, where FLARE keeps them (``nvflare.client.config``).

A FLARE ``job.py`` imports ``TransferType`` from here to pick FULL or DIFF updates, and ``ExchangeFormat`` to say
what the script's ``params`` are; both are ``fedbus.client.constants``' values, re-exported without loading the
link or torch.
"""

from fedbus.client.constants import ExchangeFormat, TransferType

__all__ = ["ExchangeFormat", "TransferType"]
