"""FLARE's recipe utilities (``nvflare.recipe.utils``): experiment tracking and cross-site evaluation.

Both change what a recipe writes into job.toml: ``[tracking] types`` (the broker writes the sites'
tracking records to TensorBoard event files, an MLflow file store and W&B offline runs in the job's
folder) and ``[cross_site_eval] enabled`` (after the strategy finishes, every site scores the final
global model and every other site's model).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fedbus.errors import ConfigError
from fedbus.jobs import TRACKING_TYPES
from fedbus.log import get_logger
from fedbus.recipes.recipe import Recipe

log = get_logger("recipes")


def _recipe(recipe: Any, what: str) -> Recipe:
    if not isinstance(recipe, Recipe):
        raise ConfigError(f"{what}: recipe must be a fedbus recipe, got {type(recipe).__name__}")
    return recipe


def add_experiment_tracking(
    recipe: Recipe, tracking_type: str, tracking_config: Mapping[str, Any] | None = None
) -> None:
    """Collect the sites' tracking records (``fedbus.client.tracking`` writers) at the broker as
    ``tracking_type``: ``"tensorboard"``, ``"mlflow"`` or ``"wandb"``; call once per type.

    ``tracking_config`` is accepted for FLARE's signature; fedbus writes every type to local files in the
    job's folder at the broker, so a given config (a tracking URI, a W&B project) is not used: a warning
    says so.
    """
    r = _recipe(recipe, "add_experiment_tracking")
    if tracking_type not in TRACKING_TYPES:
        raise ConfigError(f"tracking_type must be one of {', '.join(TRACKING_TYPES)}, got {tracking_type!r}")
    if tracking_config is not None and not isinstance(tracking_config, Mapping):
        raise ConfigError(f"tracking_config must be a dict, got {type(tracking_config).__name__}")
    if tracking_config:
        log.warning(
            "tracking_config is not used: records go to local files in the job's folder",
            tracking_type=tracking_type,
            keys=sorted(tracking_config),
        )
    types = r.tracking.setdefault("types", [])
    if tracking_type not in types:
        types.append(tracking_type)


def add_cross_site_evaluation(recipe: Recipe) -> None:
    """After the recipe's strategy finishes, have every site submit its local model, then every site score
    the final global model and each submitted model; the matrix is ``run.cross_site``.

    Training scripts answer ``flare.is_submit_model()`` tasks with their local weights and
    ``flare.is_evaluate()`` tasks with metrics, as FLARE's cross-site evaluation asks.
    """
    r = _recipe(recipe, "add_cross_site_evaluation")
    if r.cross_site_eval:
        raise ConfigError("add_cross_site_evaluation: the recipe already has a cross-site evaluation")
    r.cross_site_eval = True
