"""Privacy filters: the site's last word on what leaves it.

A filter takes the script's params (name -> CPU tensor) and returns the params to upload: clipped,
noised, with layers removed... They run at the site, after the script and before the stream, so a job
cannot skip them: the site operator installs them, not the job author. Filters must not modify their
input in place (it may be a view of the script's file); they return new tensors.

The list is empty for now; differential privacy and secure-aggregation masks will plug in here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch

from fedbus.errors import JobError

Params = dict[str, torch.Tensor]
Filter = Callable[[Params], Params]


def apply_filters(filters: Sequence[Filter], params: Params) -> Params:
    """Run ``params`` through every filter in order; a filter returning garbage is a JobError naming it."""
    for f in filters:
        out = f(params)
        name = getattr(f, "__qualname__", repr(f))
        if not isinstance(out, Mapping) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in out.items()
        ):
            raise JobError(f"privacy filter {name} must return a dict of name -> tensor")
        params = dict(out)
    return params
