"""medmvl: build, train, evaluate and ship small medical vision-language models.

Python API: ``model, processor = medmvl_cli.load("runs/NAME")`` (see docs/model.md).
"""

__version__ = "0.1.0"


def load(folder, **kwargs):
    """(model, processor) of a saved model; see `medmvl_cli.inference.load.load`."""
    from medmvl_cli.inference.load import load as _load  # heavy imports only when called

    return _load(folder, **kwargs)
