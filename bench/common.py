"""Helpers shared by the bench scripts: host facts, the DR2 model setup, thread state, help and table format.

torch and OpenCV are imported inside the functions that need them: bench_align uses this module without torch.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
from collections.abc import Iterator
from contextlib import contextmanager

DOWNSAMPLE = {"ffhq256": 32, "tiny": 4}  # 2 ** (levels - 1): the size must be divisible by it
# A SPARNetHD small enough for CPU (full size: min_ch 32, max_ch 512, min_feat_size 32, res_depth 10 at 512).
SMALL_SPARNET = {"min_ch": 16, "max_ch": 64, "min_feat_size": 16, "res_depth": 2}


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> tuple[float, float, float] | None:
    return os.getloadavg() if hasattr(os, "getloadavg") else None


@contextmanager
def kept_state(*loggers: str, opencv: bool = False) -> Iterator[None]:
    """Restores torch's (and OpenCV's) thread count and these loggers' levels: main() also runs in-process (tests)."""
    import torch

    threads0 = torch.get_num_threads()
    if opencv:
        import cv2

        cv_threads0 = cv2.getNumThreads()
    levels0 = {name: logging.getLogger(name).level for name in loggers}
    try:
        yield
    finally:
        torch.set_num_threads(threads0)
        if opencv:
            cv2.setNumThreads(cv_threads0)
        for name, level in levels0.items():
            logging.getLogger(name).setLevel(level)


def check_size(size: int, arch: str, n: int) -> None:
    if size % DOWNSAMPLE[arch] or (n > 1 and size % n):
        raise SystemExit(f"--size {size} must be divisible by {DOWNSAMPLE[arch]} ({arch}) and by N={n}")


def dr2_setup(args: argparse.Namespace) -> tuple[bool, str, int]:
    """(cuda, arch, size) from --device, --arch, --size and --N: ffhq256 at 256 on CUDA, tiny at 64 otherwise."""
    import torch

    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but no CUDA device is visible")
    arch = args.arch or ("ffhq256" if cuda else "tiny")
    size = args.size or (256 if arch == "ffhq256" else 64)
    check_size(size, arch, args.N)
    return cuda, arch, size


def enhancer_kwargs(args: argparse.Namespace, cuda: bool, esize: int) -> dict:
    """--enhancer-kwargs, else for sparnethd: the full one on CUDA, SMALL_SPARNET on CPU (at the hand-over size)."""
    if args.enhancer_kwargs is not None:
        import yaml

        kwargs = yaml.safe_load(args.enhancer_kwargs) or {}
        if not isinstance(kwargs, dict):
            raise SystemExit(f"--enhancer-kwargs {args.enhancer_kwargs!r}: expected a mapping")
        return kwargs
    if args.enhancer != "sparnethd":
        return {}
    if cuda:
        return {} if esize == 512 else {"size": esize}  # the full SPARNetHD (its defaults)
    return {**SMALL_SPARNET, "size": esize}


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps the description's layout; shows defaults except none/false/empty ones (explained in their help)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.default is False or action.default == "" \
                or action.default is argparse.SUPPRESS:
            return action.help or ""
        return super()._get_help_string(action)


def fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def text_table(head: list[str], body: list[list[str]]) -> str:
    """Aligned columns, the first left-aligned, under a dashed rule."""
    widths = [max(len(c[i]) for c in [head, *body]) for i in range(len(head))]

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    return "\n".join([line(head), line(["-" * w for w in widths]), *(line(c) for c in body)])
