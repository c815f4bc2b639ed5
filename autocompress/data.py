"""Built-in datasets and the `--data` spec parser.

The default run uses scikit-learn's `load_digits` (1,797 real handwritten digits shipped inside the
package), upscaled from 8x8 to 32x32 so that convolutions have real spatial work to do.
"""
from __future__ import annotations

import importlib
import sys

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from .errors import AutocompressError

DIGITS_SIZE = 32


def digits_tensors(size: int = DIGITS_SIZE, seed: int = 0):
    """((x, y) train, val, test) from load_digits: a fixed stratified 60/20/20 split. The search selects on
    val; test is held out, so the accuracy a front reports is not biased by the selection."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    x = (x - 0.5) / 0.5
    y = torch.tensor(digits.target, dtype=torch.long)
    idx = np.arange(len(y))
    rest, te = train_test_split(idx, test_size=0.2, random_state=seed, stratify=digits.target)
    tr, va = train_test_split(rest, test_size=0.25, random_state=seed, stratify=digits.target[rest])
    return (x[tr], y[tr]), (x[va], y[va]), (x[te], y[te])


def digits_loaders(batch_size: int = 64, size: int = DIGITS_SIZE, seed: int = 0):
    """Train, validation and test DataLoaders over the upscaled digits (train shuffled with a fixed seed)."""
    (xt, yt), (xv, yv), (xs, ys) = digits_tensors(size, seed)
    gen = torch.Generator().manual_seed(seed)
    train = DataLoader(TensorDataset(xt, yt), batch_size=batch_size, shuffle=True, generator=gen)
    return train, DataLoader(TensorDataset(xv, yv), batch_size=256), DataLoader(TensorDataset(xs, ys), batch_size=256)


def fake_loaders(shape=(3, 32, 32), classes: int = 10, n: int = 256, batch_size: int = 32, seed: int = 0):
    """Random images and labels (train, val, test: the same images): for cost-only runs and smoke tests, never
    for accuracy claims."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((n, *shape), generator=gen)
    y = torch.randint(0, classes, (n,), generator=gen)
    ds = TensorDataset(x, y)
    return tuple(DataLoader(ds, batch_size=batch_size) for _ in range(3))


def imagefolder_loaders(path: str, size: int = 224, batch_size: int = 32, seed: int = 0):
    """An ImageFolder tree split 70/15/15 (seeded) into train, validation and test loaders."""
    import os

    from torchvision import datasets, transforms

    if not os.path.isdir(path):
        raise AutocompressError(f"image folder {path!r} does not exist; pass imagefolder:DIR with one sub-folder per class")
    tf = transforms.Compose([transforms.Resize((size, size)), transforms.ToTensor()])
    try:
        ds = datasets.ImageFolder(path, transform=tf)
    except FileNotFoundError:  # no class folder, or no image in any of them
        ds = []
    if len(ds) < 2:
        raise AutocompressError(f"image folder {path!r} holds {len(ds)} images in class sub-folders; pass "
                                f"imagefolder:DIR with one sub-folder per class and at least 2 images "
                                f"({', '.join(datasets.folder.IMG_EXTENSIONS)})")
    n_val = n_test = max(1, len(ds) * 15 // 100)
    gen = torch.Generator().manual_seed(seed)
    train, val, test = torch.utils.data.random_split(ds, [len(ds) - n_val - n_test, n_val, n_test], generator=gen)
    return (DataLoader(train, batch_size=batch_size, shuffle=True, generator=gen),
            DataLoader(val, batch_size=batch_size), DataLoader(test, batch_size=batch_size))


def load_data(spec: str, input_shape=None, classes: int | None = None):
    """Resolve a `--data` spec: digits, fake, imagefolder:PATH or package.module:function, to (train, val, test)
    loaders (test is None when a data function returns only train and val)."""
    if spec == "digits":
        return digits_loaders()
    if spec == "fake":
        shape = tuple(input_shape[1:]) if input_shape is not None else (3, 32, 32)
        return fake_loaders(shape, classes or 10)
    if spec.startswith("imagefolder:"):
        size = input_shape[-1] if input_shape is not None else 224
        return imagefolder_loaders(spec.split(":", 1)[1], size=size)
    if ":" in spec:
        loaders = call_factory(spec, "data function", "must return (train_loader, val_loader[, test_loader])")
        if not (isinstance(loaders, (tuple, list)) and len(loaders) in (2, 3)):
            raise AutocompressError(f"data function {spec!r} must return (train_loader, val_loader) or (train_loader, "
                                    f"val_loader, test_loader), got {type(loaders).__name__}")
        return split_data(loaders)
    raise AutocompressError(f"unknown data {spec!r}; allowed: digits, fake, imagefolder:PATH, package.module:function")


def split_data(data) -> tuple:
    """(train, val, test) from data=(train, val) or (train, val, test); test None when not given."""
    if not (isinstance(data, (tuple, list)) and len(data) in (2, 3)):
        raise AutocompressError(f"data must be (train_loader, val_loader) or (train_loader, val_loader, test_loader), "
                                f"got {type(data).__name__}{f' of {len(data)}' if isinstance(data, (tuple, list)) else ''}")
    return (*data, None) if len(data) == 2 else tuple(data)


def resolve_callable(spec: str, what: str):
    """Import `package.module:attribute` and return the attribute, with a clear error when missing."""
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except (Exception, SystemExit) as exc:  # not found, or the module itself fails (or exits) on import
        raise AutocompressError(f"cannot import module {module_name!r} for {what} {spec!r}: {_said(exc)}") from None
    if not hasattr(module, attr):
        raise AutocompressError(f"module {module_name!r} has no attribute {attr!r} (from {what} {spec!r})")
    return getattr(module, attr)


def call_factory(spec: str, what: str, contract: str):
    """Import `package.module:function` and call it with no arguments; whatever it raises (or an exit it asks
    for) is one sentence naming the spec and what such a function must do (`contract`)."""
    factory = resolve_callable(spec, what)
    try:
        return factory()
    except (Exception, SystemExit) as exc:
        raise AutocompressError(f"{what} {spec!r} failed when called with no arguments ({_said(exc)}); a {what} "
                                f"takes no arguments and {contract}") from None


def announce(what: str, spec: str, where: str, also: str = "") -> None:
    """Say, before calling it, which code a run recorded (`where`) makes this process call: a spec stored in a
    folder or study is code someone else chose."""
    print(f"{what}: calling {spec!r}{also}, as {where} records it", file=sys.stderr)


def load_recorded_data(config: dict, where: str):
    """The loaders of the data spec a run recorded (`config` of a study or run folder, described by `where`),
    named on stderr before it is called; None for a cost-only run."""
    if not config.get("data"):
        return None
    announce("data", config["data"], where)
    return load_data(config["data"], tuple(config.get("input_shape") or ()) or None)


def _said(exc: BaseException) -> str:
    """An exception in a few words: its type and the first line of its message."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__
