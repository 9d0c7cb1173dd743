"""The one place that imports megatron-core's dataset modules, quietly.

Importing any `megatron.core` submodule runs the package `__init__`, which pulls in its model and
optimizer code (about 3 s) and warns that Transformer Engine and Apex are missing: we need neither
for data, so those warnings are dropped here. Its dataset code logs every index it builds at INFO;
we keep WARNING and above, minus the harmless note about blending a single dataset.
"""

from __future__ import annotations

import importlib
import logging
import warnings
from types import ModuleType

_IMPORT_WARNINGS = (
    r"Transformer Engine and Apex are not installed",
    r"The following imports from `dynamic_context.py` will be removed",
    r"`torch.jit.script_method` is deprecated",
)


class _DropSingleBlendNote(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "BlendedDataset for a single MegatronDataset" not in record.getMessage()


def mcore(name: str) -> ModuleType:
    """`mcore("datasets.gpt_dataset")` imports `megatron.core.datasets.gpt_dataset` without the noise."""
    with warnings.catch_warnings():
        for message in _IMPORT_WARNINGS:
            warnings.filterwarnings("ignore", message=message)
        module = importlib.import_module(f"megatron.core.{name}")
    logging.getLogger("megatron.core").setLevel(logging.WARNING)
    blended = logging.getLogger("megatron.core.datasets.blended_dataset")
    if not any(isinstance(f, _DropSingleBlendNote) for f in blended.filters):
        blended.addFilter(_DropSingleBlendNote())
    return module
