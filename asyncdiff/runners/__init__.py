"""Executors of an AsyncDiff plan: in-process (reference) and torch.distributed."""

from asyncdiff.runners.cache import ActivationCache
from asyncdiff.runners.local import LocalRunner

__all__ = ["ActivationCache", "LocalRunner"]
