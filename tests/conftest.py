"""Shared fixtures: the real digits data and the trained built-in model (trained once, then cached)."""
import warnings

import pytest
import torch

warnings.filterwarnings("ignore", category=FutureWarning)


@pytest.fixture(scope="session")
def digits_data():
    from autocompress.data import digits_loaders

    return digits_loaders()


@pytest.fixture(scope="session")
def digits_model():
    from autocompress.models import digits_resnet

    return digits_resnet()


@pytest.fixture(scope="session")
def digits_input():
    return torch.randn(1, 1, 32, 32, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="session")
def host():
    """The calibrated host profile (calibrated once per machine, then read from the cache)."""
    from autocompress.cost.hardware import load_profile

    return load_profile("host")
