"""The site daemon: keeps a connection to the broker and runs each deployed job's training script.

``Site(SiteConfig(name=..., broker=...)).run()`` is what ``fedbus site`` does; tests and the simulator use
``async with Site(cfg):``. Privacy filters (``filters=[...]``) see every update before it leaves the site.
"""

from fedbus.site.daemon import Site
from fedbus.site.filters import Filter, apply_filters
from fedbus.site.runner import JobRunner, RunnerSettings

__all__ = ["Filter", "JobRunner", "RunnerSettings", "Site", "apply_filters"]
