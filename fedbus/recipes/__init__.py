"""Recipes and execution environments: one job definition, run in simulation, on local processes or in
production by swapping only the environment.

```python
from fedbus.recipes import FedAvgRecipe, SimEnv, PocEnv, ProdEnv

recipe = FedAvgRecipe(name="hello-pt", model=Net(), train_script="client.py", min_clients=3, num_rounds=3,
                      train_args="--batch_size 16 --epochs 1")
run = recipe.execute(SimEnv(num_clients=3))          # or PocEnv(3), or ProdEnv(startup_kit_location=...)
print(run.get_status(), run.get_result(), run.metrics)
recipe.export(job_dir="jobs/")                       # the same job as a folder for `fedbus submit`
```

The names a FLARE ``job.py`` imports from ``nvflare.recipe``, ``nvflare.app_opt.pt.recipes``,
``nvflare.app_common.np.recipes`` and ``nvflare.apis.dxo`` are here (docs/recipes.md has the table).
"""

from fedbus.client.constants import DataKind, ExchangeFormat, NPConstants, TransferType
from fedbus.recipes.algorithms import CyclicRecipe, FedEvalRecipe, FedOptRecipe, FedProxRecipe, ScaffoldRecipe
from fedbus.recipes.numpy_recipes import FedAvgLrRecipe, NumpyCrossSiteEvalRecipe, NumpyFedAvgRecipe
from fedbus.recipes.poc import PocEnv, ProdEnv
from fedbus.recipes.progress import Progress
from fedbus.recipes.recipe import FedAvgRecipe, FedBuffRecipe, Recipe
from fedbus.recipes.run import Evaluation, Run
from fedbus.recipes.sim import SimEnv
from fedbus.recipes.speed import SpeedProfile
from fedbus.recipes.utils import add_cross_site_evaluation, add_experiment_tracking

__all__ = [
    "CyclicRecipe",
    "DataKind",
    "Evaluation",
    "ExchangeFormat",
    "FedAvgLrRecipe",
    "FedAvgRecipe",
    "FedBuffRecipe",
    "FedEvalRecipe",
    "FedOptRecipe",
    "FedProxRecipe",
    "NPConstants",
    "NumpyCrossSiteEvalRecipe",
    "NumpyFedAvgRecipe",
    "PocEnv",
    "ProdEnv",
    "Progress",
    "Recipe",
    "Run",
    "ScaffoldRecipe",
    "SimEnv",
    "SpeedProfile",
    "TransferType",
    "add_cross_site_evaluation",
    "add_experiment_tracking",
]
