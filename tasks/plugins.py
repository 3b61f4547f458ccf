"""Plug-in classes named in configs ('package.module:Class'): imported by name, built the same way in every
actor (seeded), and given their weights strictly, or labelled random-init when a demo allows it.

Used by the enhancer (enhancer.name), the learned blur estimator (dynamic.estimator) and plug-in face
detectors (detector.name); each passes the option's name so errors say which setting to fix.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

import torch

from tasks.weights import load_weights, random_init_label


def import_plugin(name: str, option: str, expected: str) -> Callable[..., Any]:
    """The class (or factory) `name` names: 'pkg.module:Class' or 'pkg.module.Class'.

    option: the config key (for messages), expected: what else the option accepts ("mtcnn, haar").
    """
    module, sep, attr = name.partition(":")
    if not sep:
        module, _, attr = name.rpartition(".")
    if not module or not attr:
        raise ValueError(f"unknown {option} {name!r}: expected {expected}, or a plug-in class "
                         "'pkg.module:Class' / 'pkg.module.Class'")
    try:
        mod = importlib.import_module(module)
    except ImportError as e:
        raise ValueError(f"{option} {name!r}: cannot import module {module!r}: {e}") from e
    try:
        return getattr(mod, attr)
    except AttributeError:
        raise ValueError(f"{option} {name!r}: module {module!r} has no attribute {attr!r}") from None


def has_parameters(model: Any) -> bool:
    return isinstance(model, torch.nn.Module) and any(True for _ in model.parameters())


def build_network(factory: Callable[..., Any], kwargs: dict, *, name: str, weights: str | None,
                  sha256: str | None, allow_random_weights: bool, missing: str,
                  storage_options: dict | None = None) -> tuple[Any, str]:
    """(model in eval mode without grads, weights identity).

    Built under a fixed seed, so a random-init network is the same in every actor and run. With weights:
    loaded strictly, identity 'sha256:...'. Without: a parameter-free callable is its own identity (name);
    a network with parameters runs only when allowed, as 'random-init:<name>', else RuntimeError(missing).
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = factory(**kwargs)
    if isinstance(model, torch.nn.Module):
        model = model.eval().requires_grad_(False)
    if weights:
        return model, load_weights(model, weights, sha256=sha256, storage_options=storage_options)
    if not has_parameters(model):
        return model, name
    if allow_random_weights:
        return model, random_init_label(name)
    raise RuntimeError(missing)
