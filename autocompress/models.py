"""Built-in models and the `--model` spec parser.

`digits_resnet` is a small residual CNN for the upscaled digits: trained once on first use and
cached under the user's cache directory, so the default run and the tests start from a real,
trained model without downloading anything.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
from torch import nn

from .data import DIGITS_SIZE, announce, call_factory, digits_loaders
from .errors import AutocompressError


def cache_dir() -> Path:
    """Where trained built-ins and host calibrations live (AUTOCOMPRESS_CACHE overrides)."""
    root = os.environ.get("AUTOCOMPRESS_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "autocompress")
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 convs with BN, identity or 1x1 projection shortcut."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class DigitsResNet(nn.Module):
    """A ResNet-style CNN for 1x32x32 inputs: stem, three stages of `blocks` basic blocks, pool, linear
    (blocks=3 with widths (16, 32, 64) is ResNet-20's shape)."""

    def __init__(self, widths=(32, 64, 128), classes: int = 10, in_channels: int = 1, blocks: int = 2):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False),
                                  nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True))
        stages, cin = [], widths[0]
        for i, w in enumerate(widths):
            stages.append(nn.Sequential(BasicBlock(cin, w, 1 if i == 0 else 2),
                                        *[BasicBlock(w, w) for _ in range(blocks - 1)]))
            cin = w
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x):
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


BUILTIN_INPUT = {"digits_resnet": (1, 1, DIGITS_SIZE, DIGITS_SIZE)}


def train_classifier(model: nn.Module, train_loader, epochs: int, lr: float = 0.05, seed: int = 0) -> nn.Module:
    """Plain SGD + cosine schedule training, deterministic for a fixed seed."""
    torch.manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4, nesterov=True)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * len(train_loader))
    model.train()
    for _ in range(epochs):
        for x, y in train_loader:
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            sched.step()
    return model.eval()


def digits_resnet(pretrained: bool = True, epochs: int = 5) -> nn.Module:
    """The built-in digits model; trained once (about a minute on 2 cores) and cached. Initialisation and training
    are seeded, so every machine trains the same model (and a test never depends on which one it got)."""
    with torch.random.fork_rng():  # seeded without disturbing the caller's random state
        torch.manual_seed(0)
        model = DigitsResNet()
    if not pretrained:
        return model.eval()
    tag = hashlib.sha1(f"digits_resnet-v4-{epochs}".encode()).hexdigest()[:10]  # v4: the 60/20/20 split
    path = cache_dir() / f"digits_resnet-{tag}.pt"
    if path.exists():
        model.load_state_dict(torch.load(path, weights_only=True))
        return model.eval()
    train = digits_loaders(seed=0)[0]
    with torch.random.fork_rng():
        train_classifier(model, train, epochs=epochs)
    tmp = path.with_suffix(".tmp")
    torch.save(model.state_dict(), tmp)
    os.replace(tmp, path)  # atomic: a killed first run never leaves a half-written cache
    return model


BUILTINS = {"digits_resnet": digits_resnet}


def load_model(spec: str, checkpoint: str | None = None) -> nn.Module:
    """Resolve `--model`: a built-in name, `torchvision:NAME`, or `package.module:factory`."""
    if spec in BUILTINS:
        model = BUILTINS[spec](pretrained=checkpoint is None)
    elif spec.startswith("torchvision:"):
        model = _torchvision_model(spec.split(":", 1)[1])
    elif ":" in spec:
        model = call_factory(spec, "model factory", "must return a torch.nn.Module")
        if not isinstance(model, nn.Module):
            raise AutocompressError(f"model factory {spec!r} returned {type(model).__name__}, not a torch.nn.Module")
    else:
        allowed = ", ".join(sorted(BUILTINS)) + ", torchvision:NAME, package.module:factory"
        raise AutocompressError(f"unknown model {spec!r}; allowed: {allowed}")
    if checkpoint:
        load_checkpoint(model, checkpoint)
    return model.eval()


def load_recorded(config: dict, where: str, state: dict | None = None) -> nn.Module:
    """The uncompressed model a run recorded (`config` of a study or run folder, described by `where`): its model
    spec is named on stderr, then called, given `state` (the run's saved base weights) when there is one, and
    checked against the recorded fingerprint, so the trials' weights and policies fit it."""
    spec, checkpoint = config["model_spec"], config.get("checkpoint")
    announce("model", spec, where, f" and loading checkpoint {checkpoint!r}" if checkpoint else "")
    model = load_model(spec, checkpoint)
    if state is not None:
        load_state(model, state, f"base_model.pt of {where}")
    if config.get("model") not in (None, model_fingerprint(model)):
        raise AutocompressError(f"model {spec!r} (checkpoint {checkpoint!r}) on this machine differs from the one "
                                f"{where} was made with; it needs the same model code and checkpoint file")
    return model


def model_fingerprint(model: nn.Module) -> str:
    """A short hash of the model's architecture and weights, so a resumed study is the same problem."""
    h = hashlib.sha1(str(model).encode())
    for name, tensor in model.state_dict().items():
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes()[:4096])
    return h.hexdigest()[:16]


def _torchvision_model(name: str) -> nn.Module:
    import torchvision

    names = torchvision.models.list_models(module=torchvision.models)
    if name not in names:
        raise AutocompressError(f"unknown torchvision model {name!r}; allowed: {', '.join(sorted(names))}")
    return torchvision.models.get_model(name, weights=None)


def load_checkpoint(model: nn.Module, path: str) -> None:
    """Load a state_dict safely (weights_only=True); accepts {'state_dict': ...} wrappers."""
    if not os.path.isfile(path):
        raise AutocompressError(f"checkpoint {path!r} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt file, pickle with code, wrong format
        raise AutocompressError(f"checkpoint {path!r} is not a loadable state_dict ({type(exc).__name__})") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    load_state(model, state, f"checkpoint {path!r}")


def load_state(model: nn.Module, state, source: str) -> None:
    """`model.load_state_dict(state)`; a state of another architecture is one sentence naming its `source`."""
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as exc:  # other keys or shapes, or not a state_dict at all
        lines = [line.strip() for line in str(exc).splitlines()]  # the first only says "Error(s) in loading"
        detail = " ".join(lines[1:] or lines)
        detail = detail if len(detail) <= 300 else detail[:300] + " ..."
        raise AutocompressError(f"{source} does not match the model: {detail}") from None


def default_input(spec: str, model: nn.Module) -> torch.Tensor:
    """An example input for a model spec: the built-in's own shape, else 1x3x224x224 (299 for inception)."""
    if spec in BUILTIN_INPUT:
        return torch.randn(BUILTIN_INPUT[spec])
    size = 299 if "inception" in spec else 224
    return torch.randn(1, 3, size, size)
