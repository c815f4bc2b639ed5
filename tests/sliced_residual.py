"""A model whose residual adds go into a slice of the channels (as timm's ReXNet does): Torch-Pruning's group of
such a layer grows without end."""
import torch
from torch import nn


class SlicedResidual(nn.Module):
    """conv -> depthwise -> conv widening `cin` to `cout`; the input is added into the first `cin` channels."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(cin, cin * 2, 1), nn.BatchNorm2d(cin * 2), nn.ReLU(),
                                  nn.Conv2d(cin * 2, cin * 2, 3, padding=1, groups=cin * 2), nn.ReLU(),
                                  nn.Conv2d(cin * 2, cout, 1), nn.BatchNorm2d(cout))
        self.cin = cin

    def forward(self, x):
        y = self.body(x)
        return torch.cat([y[:, :self.cin] + x, y[:, self.cin:]], dim=1)


def sliced_net(widths=(16, 20, 24, 28, 32, 36, 40, 44)) -> nn.Module:
    blocks = [SlicedResidual(a, b) for a, b in zip(widths, widths[1:])]
    return nn.Sequential(nn.Conv2d(3, widths[0], 3, padding=1), *blocks, nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(widths[-1], 10))
