"""The broker daemon: site registry, job store, one controller per running job."""

from fedbus.broker.server import Broker

__all__ = ["Broker"]
