"""hello-dp's model: a small MLP for tabular data."""

from torch import nn


class TabularMLP(nn.Module):
    def __init__(self, input_dim=29, hidden_dims=(64, 32), output_dim=2):
        super().__init__()
        layers, width = [], input_dim
        for hidden in hidden_dims:
            layers += [nn.Linear(width, hidden), nn.ReLU()]
            width = hidden
        layers.append(nn.Linear(width, output_dim))
        self.model = nn.Sequential(*layers)

    def forward(self, x):
        return self.model(x)
