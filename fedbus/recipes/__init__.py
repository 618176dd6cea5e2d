"""Recipes and execution environments: one job definition, run in simulation, on local processes or in
production by swapping only the environment.

```python
from fedbus.recipes import FedAvgRecipe, SimEnv, PocEnv, ProdEnv

recipe = FedAvgRecipe("hello-pt", model=Net(), train_script="client.py", files=["net.py"],
                      min_clients=3, num_rounds=3)
run = recipe.execute(SimEnv(num_clients=3))          # or PocEnv(3), or ProdEnv("tcp://broker:7788")
print(run.status, run.history[-1]["metrics"])
recipe.export("job/")                                # the same job as a folder for `fedbus submit`
```
"""

from fedbus.recipes.poc import PocEnv, ProdEnv
from fedbus.recipes.progress import Progress
from fedbus.recipes.recipe import FedAvgRecipe, FedBuffRecipe, Recipe
from fedbus.recipes.run import Evaluation, Run
from fedbus.recipes.sim import SimEnv
from fedbus.recipes.speed import SpeedProfile

__all__ = [
    "Evaluation",
    "FedAvgRecipe",
    "FedBuffRecipe",
    "PocEnv",
    "ProdEnv",
    "Progress",
    "Recipe",
    "Run",
    "SimEnv",
    "SpeedProfile",
]
