"""The experiment trackers HF Trainer reports to (`train.report_to`), and what each one needs.

The names are those of `TrainingArguments.report_to` (transformers' `INTEGRATION_TO_CALLBACK`;
a unit test keeps this table equal to it). Each maps to the module that must import for it and
the pip package that provides that module.
"""

from __future__ import annotations

import importlib.util

TRACKERS: dict[str, tuple[str | None, str | None]] = {
    "azure_ml": ("azureml.core", "azureml-core"),
    "clearml": ("clearml", "clearml"),
    "codecarbon": ("codecarbon", "codecarbon"),
    "comet_ml": ("comet_ml", "comet-ml"),
    "dagshub": ("dagshub", "dagshub mlflow"),
    "dvclive": ("dvclive", "dvclive"),
    "flyte": ("flytekit", "flytekit"),
    "kubeflow": (None, None),  # configured by $KUBEFLOW_TRAINER_SERVER_URL, no package of its own
    "mlflow": ("mlflow", "mlflow"),
    "neptune": ("neptune", "neptune"),
    "swanlab": ("swanlab", "swanlab"),
    "tensorboard": ("tensorboard", "tensorboard"),
    "trackio": ("trackio", "trackio"),
    "wandb": ("wandb", "wandb"),
}
NO_TRACKER = "none"


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package missing, or a broken install
        return False


def missing_package(name: str) -> str | None:
    """The pip install that tracker `name` lacks here, or None when it can run."""
    module, package = TRACKERS.get(name, (None, None))
    if module is None:
        return None
    if name == "dagshub" and not _importable("mlflow"):
        return package
    return None if _importable(module) else package
