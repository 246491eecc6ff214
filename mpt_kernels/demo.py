"""``mpt-kernels demo``: negative flips on scikit-learn's digits, CE vs PCT vs MPT.

The experiment of the MPT paper in miniature, on the 8x8 digits bundled with
scikit-learn (1797 images, 10 classes; nothing is downloaded):

* an **old model** is trained on the old classes 0-4 only (a 5-way classifier);
* a **new reference** is trained independently, with plain cross-entropy, on all 10
  classes (MPT's second distillation source);
* three **new models** are trained from one shared initialisation on all 10 classes:
  ``ce`` plain cross-entropy; ``pct`` focal distillation from the old model plus CE
  (``mpt_loss`` with only ``old_logits`` and ``new_class_bias=0``: PCT's loss); ``mpt``
  the margin bias plus focal distillation from both the old model and the new
  reference (``mpt_loss`` with ``old_logits`` and ``new_logits``).

Each is measured on the test split: accuracy over all classes, the old classes and the
new classes, and, on the test images of the old classes (as in the paper's tables), the
negative flip rate against the old model and the relative NFR (the flips over those
expected if the two models erred independently). Results are mean ± std (n - 1) over
seeds. A seed fixes the split, the noise and every initialisation; the three new models
of a seed share their initialisation and noise, so they differ only by their loss.

Why this set-up. Flips need errors, and errors that a new model does not simply
repeat. On the clean images the MLP below reaches ~94 % and the three losses end
within one std of each other in NFR, so the task is made harder and the models kept
small: an MLP 64-32-C (ReLU) trained on a stratified 20 % of the images (~360; the
other ~1440 are the test split, ~720 of them old-class images, so one flip is ~0.14 %),
with Gaussian pixel noise (std 0.3 on pixels scaled to [0, 1]): fresh noise at every
training step (augmentation, which also gives the distillation more inputs than the
360 images to match the teachers on) and one fixed draw on the test images.
Full-batch Adam (lr 0.005, weight decay 1e-4) for 200 steps: long enough for ~86 %
test accuracy, short of the point where every model fits its 360 images exactly (after
~300 steps at lr 0.01, the distillation no longer changed the flips). Plain CE then
flips ~7 % of the old model's correct old-class answers.

MPT uses the paper's defaults (α = 1, β = 5, τ = 5, KL without the τ² factor) except
the new-class bias b, which defaults to 1 (``--bias``). The authors search b over
{0, 1, 2, 4}; with 5 seeds here, b = 0 / 1 / 2 / 4 gave NFR 6.8 / 5.0 / 3.7 / 2.5 %
for accuracy 86.4 / 86.0 / 85.0 / 81.9 % (new classes 85.3 / 82.8 / 79.2 / 71.9 %;
CE: NFR 7.3 %, accuracy 86.2 %): b = 1 is the largest value that keeps overall accuracy
at CE's level, b = 4 buys fewer flips with 13 points of new-class accuracy.

The losses are the package's own (``mpt_kernels.margin_cross_entropy`` and
``mpt_kernels.mpt_loss`` with ``backend="auto"``: the reference backend for CPU tensors,
the fused kernels with ``--device cuda``), and so are the metrics
(``mpt_kernels.metrics``); the header names the backend used. The models are tiny, so
torch runs on one thread by default (``--threads``): more threads only add
synchronisation for matrices of this size (on a busy 2-core machine, 2 threads made the
run 10x slower). The full run takes about 15 s of CPU time.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass

import torch
from torch import nn

METHODS = ("ce", "pct", "mpt")


class MissingDependency(ImportError):
    """scikit-learn, which the demo needs for its data, is not installed."""


@dataclass(frozen=True)
class DemoConfig:
    seeds: int = 5
    steps: int = 200  # full-batch Adam steps per model
    hidden: int = 32  # hidden units of the MLP; 0 for a linear model
    train_fraction: float = 0.2  # of the 1797 images; the rest is the test split
    noise: float = 0.3  # std of the Gaussian noise on the [0, 1]-scaled pixels
    lr: float = 0.005
    weight_decay: float = 1e-4
    num_old_classes: int = 5
    new_class_bias: float = 1.0  # MPT's b
    tau: float = 5.0
    alpha: float = 1.0
    beta: float = 5.0
    device: str = "cpu"

    def __post_init__(self):
        if self.seeds < 1 or self.steps < 1:
            raise ValueError(f"seeds and steps must be at least 1, got {self.seeds} and {self.steps}")
        if self.hidden < 0:
            raise ValueError(f"hidden must be >= 0 (0: a linear model), got {self.hidden}")
        if not 0.0 < self.train_fraction < 1.0:
            raise ValueError(f"train_fraction must be in (0, 1), got {self.train_fraction}")
        if not (self.noise >= 0.0 and math.isfinite(self.noise)):
            raise ValueError(f"noise must be a finite std >= 0, got {self.noise}")
        if not math.isfinite(self.new_class_bias):
            raise ValueError(f"new_class_bias must be finite, got {self.new_class_bias}")
        device = torch.device(self.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {self.device!r} asked for, but no CUDA device is visible to torch")


QUICK = {"seeds": 2, "steps": 30}  # --quick: checks that everything runs, measures nothing


def add_arguments(parser: argparse.ArgumentParser) -> None:
    default = DemoConfig()
    parser.add_argument("--seeds", type=int, default=None, help=f"number of seeds (default {default.seeds})")
    parser.add_argument("--steps", type=int, default=None,
                        help=f"full-batch Adam steps per model (default {default.steps})")
    parser.add_argument("--bias", type=float, default=default.new_class_bias,
                        help=f"MPT's new-class bias b (default {default.new_class_bias:g})")
    parser.add_argument("--hidden", type=int, default=default.hidden,
                        help=f"hidden units of the MLP, 0 for a linear model (default {default.hidden})")
    parser.add_argument("--noise", type=float, default=default.noise,
                        help=f"std of the pixel noise (default {default.noise:g})")
    parser.add_argument("--train-fraction", type=float, default=default.train_fraction,
                        help=f"fraction of the images used for training (default {default.train_fraction:g})")
    parser.add_argument("--device", default=default.device,
                        help="torch device; cuda runs the losses' Triton kernels (default cpu)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--quick", action="store_true",
                        help=f"a tiny run ({QUICK['seeds']} seeds, {QUICK['steps']} steps) that only checks it works")
    parser.add_argument("--json", metavar="PATH", default=None, help="also write the results as JSON to PATH")


# --------------------------------------------------------------------------- data
def load_digits_split(config: DemoConfig, seed: int):
    """(x_train, y_train, x_test, y_test): a stratified split, noise on the test images."""
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as error:
        raise MissingDependency(
            f"the demo needs scikit-learn for its bundled digits data ({error}): "
            "pip install 'mpt-kernels[demo]'"
        ) from error
    images, labels = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(
        images / 16.0, labels, train_size=config.train_fraction, stratify=labels, random_state=seed
    )
    generator = torch.Generator().manual_seed(seed)

    def tensors(x, y, noise):
        x = torch.as_tensor(x, dtype=torch.float32)
        x = x + noise * torch.randn(x.shape, generator=generator)
        return x.to(config.device), torch.as_tensor(y, dtype=torch.int64).to(config.device)

    # the training images get fresh noise at every step (see train); the test images once
    return (*tensors(x_train, y_train, 0.0), *tensors(x_test, y_test, config.noise))


# --------------------------------------------------------------------------- models
def make_model(config: DemoConfig, num_features: int, num_classes: int, seed: int) -> nn.Module:
    with torch.random.fork_rng(devices=[]):  # leave the caller's random state alone
        torch.manual_seed(seed)
        if config.hidden == 0:
            model = nn.Linear(num_features, num_classes)
        else:
            model = nn.Sequential(
                nn.Linear(num_features, config.hidden), nn.ReLU(), nn.Linear(config.hidden, num_classes)
            )
    return model.to(config.device)


def train(model: nn.Module, x: torch.Tensor, loss_of, config: DemoConfig, seed: int) -> nn.Module:
    """Full-batch Adam on ``loss_of(model(x + noise), x + noise)``, fresh noise every step."""
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    generator = torch.Generator(x.device).manual_seed(seed)
    for _ in range(config.steps):
        noisy = x + config.noise * torch.randn(x.shape, generator=generator, device=x.device)
        optimizer.zero_grad(set_to_none=True)
        loss_of(model(noisy), noisy).backward()
        optimizer.step()
    return model.eval()


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(x)


# --------------------------------------------------------------------------- one seed
def evaluate(new_logits, old_logits, y, num_old_classes: int) -> dict:
    from . import metrics

    old_rows = y < num_old_classes
    return {
        "accuracy": metrics.accuracy(new_logits, y),
        "accuracy_old_classes": metrics.accuracy(new_logits[old_rows], y[old_rows]),
        "accuracy_new_classes": metrics.accuracy(new_logits[~old_rows], y[~old_rows]),
        "nfr": metrics.negative_flip_rate(old_logits[old_rows], new_logits[old_rows], y[old_rows]),
        "relative_nfr": metrics.relative_negative_flip_rate(
            old_logits[old_rows], new_logits[old_rows], y[old_rows]
        ),
    }


def run_seed(config: DemoConfig, seed: int, progress) -> dict:
    """Train the old model, the new reference and the three new models of one seed."""
    import mpt_kernels
    from . import metrics

    x_train, y_train, x_test, y_test = load_digits_split(config, seed)
    num_features, num_classes, k = x_train.shape[1], 10, config.num_old_classes
    old_rows = y_train < k
    focal = dict(tau=config.tau, alpha=config.alpha, beta=config.beta)

    def cross_entropy(y):
        return lambda logits, inputs: mpt_kernels.margin_cross_entropy(logits, y)

    # Distinct initialisations (and noise streams) for the old model and the new
    # reference; the three new models share one, so only their losses differ.
    old_model = make_model(config, num_features, k, seed=1000 * seed + 1)
    train(old_model, x_train[old_rows], cross_entropy(y_train[old_rows]), config, seed=1000 * seed + 1)
    new_reference = make_model(config, num_features, num_classes, seed=1000 * seed + 2)
    train(new_reference, x_train, cross_entropy(y_train), config, seed=1000 * seed + 2)

    losses = {
        "ce": cross_entropy(y_train),
        "pct": lambda logits, inputs: mpt_kernels.mpt_loss(
            logits, y_train, predict(old_model, inputs), new_class_bias=0.0, **focal
        ),
        "mpt": lambda logits, inputs: mpt_kernels.mpt_loss(
            logits, y_train, predict(old_model, inputs), predict(new_reference, inputs),
            new_class_bias=config.new_class_bias, **focal,
        ),
    }
    old_test = predict(old_model, x_test)
    old_test_rows = y_test < k
    result = {
        "old_model": {"accuracy_old_classes": metrics.accuracy(old_test[old_test_rows], y_test[old_test_rows])},
        "new_reference": evaluate(predict(new_reference, x_test), old_test, y_test, k),
    }
    for method, loss in losses.items():
        start = time.perf_counter()
        model = make_model(config, num_features, num_classes, seed=1000 * seed + 3)
        train(model, x_train, loss, config, seed=1000 * seed + 3)
        result[method] = evaluate(predict(model, x_test), old_test, y_test, k)
        progress(
            f"  {method:<4} accuracy {result[method]['accuracy']:.3f}  NFR {result[method]['nfr']:.4f}"
            f"  ({time.perf_counter() - start:.1f} s)"
        )
    return result


# --------------------------------------------------------------------------- all seeds
def _mean_std(values) -> tuple[float, float]:
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def summarise(per_seed: list, names) -> dict:
    summary = {}
    for name in names:
        entry = {}
        for metric in per_seed[0][name]:
            mean, std = _mean_std([seed_result[name][metric] for seed_result in per_seed])
            entry[metric], entry[f"{metric}_std"] = mean, std
        summary[name] = entry
    return summary


def run_experiment(config: DemoConfig, progress=None) -> dict:
    """Every seed's models and metrics; the JSON-able result of the demo."""
    import mpt_kernels
    from ._registry import select_backend

    progress = progress or (lambda message: None)
    backend = select_backend("softmax", "auto", torch.empty(0, 10, device=config.device)).name
    progress(f"digits negative-flip demo: {config.seeds} seeds x 5 models, {config.steps} steps, "
             f"losses on the {backend!r} backend ({config.device})")
    per_seed = []
    for seed in range(config.seeds):
        start = time.perf_counter()
        progress(f"seed {seed + 1}/{config.seeds}: old model, new reference, then the new models")
        per_seed.append(run_seed(config, seed, progress))
        progress(f"  seed {seed + 1} done in {time.perf_counter() - start:.1f} s")
    return {
        "methods": summarise(per_seed, METHODS),
        "references": summarise(per_seed, ("old_model", "new_reference")),
        "seeds": list(range(config.seeds)),
        "config": {**asdict(config), "backend": backend, "mpt_kernels": mpt_kernels.__version__},
        "per_seed": per_seed,
    }


def format_table(result: dict) -> str:
    config = result["config"]
    k = config["num_old_classes"]
    old = result["references"]["old_model"]
    header = (
        f"Negative flips on digits: old model on classes 0-{k - 1}, new models on 0-9; "
        f"{len(result['seeds'])} seeds, mean ± std.\n"
        f"NFR and relative NFR on the old classes' test samples; old model's accuracy there "
        f"{100 * old['accuracy_old_classes']:.1f} ± {100 * old['accuracy_old_classes_std']:.1f} %.\n"
        f"MPT: b = {config['new_class_bias']:g}, tau = {config['tau']:g}, alpha = {config['alpha']:g}, "
        f"beta = {config['beta']:g}; PCT: the same focal distillation from the old model only, b = 0."
    )
    columns = [("accuracy", "acc all %", 100), ("accuracy_old_classes", "acc old %", 100),
               ("accuracy_new_classes", "acc new %", 100), ("nfr", "NFR %", 100),
               ("relative_nfr", "rel. NFR", 1)]
    rows = [f"{'method':<10}" + "".join(f"{title:>15}" for _, title, _ in columns)]
    for method, entry in [*result["methods"].items(), ("(new ref)", result["references"]["new_reference"])]:
        cells = []
        for metric, _, scale in columns:
            digits = 2 if scale == 100 else 3
            cells.append(f"{scale * entry[metric]:.{digits}f} ± {scale * entry[metric + '_std']:.{digits}f}")
        rows.append(f"{method:<10}" + "".join(f"{cell:>15}" for cell in cells))
    return header + "\n\n" + "\n".join(rows)


def config_from_args(args) -> DemoConfig:
    defaults = DemoConfig(**QUICK) if args.quick else DemoConfig()
    return DemoConfig(
        seeds=defaults.seeds if args.seeds is None else args.seeds,
        steps=defaults.steps if args.steps is None else args.steps,
        hidden=args.hidden, train_fraction=args.train_fraction, noise=args.noise,
        new_class_bias=args.bias, device=args.device,
    )


def run(args) -> int:
    try:
        config = config_from_args(args)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, args.threads))
    try:
        start = time.perf_counter()
        result = run_experiment(config, progress=lambda message: print(message, file=sys.stderr, flush=True))
        result["seconds"] = time.perf_counter() - start
    except MissingDependency as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    finally:
        torch.set_num_threads(threads)
    print(format_table(result))
    print(f"\n{result['seconds']:.1f} s")
    if args.json:
        with open(args.json, "w") as stream:
            json.dump(result, stream, indent=2)
    return 0
