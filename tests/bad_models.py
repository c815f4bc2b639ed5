"""Model factories and data functions that misbehave on purpose, for the bad-input tests."""
from torch import nn


class ShapeMismatch(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(7, 3)

    def forward(self, x):
        return self.fc(x.flatten(1))


def shape_mismatch():
    return ShapeMismatch()


def tiny_cnn():
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4))


def not_a_module():
    return 42
