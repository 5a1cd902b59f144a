"""medmvl: build, train, evaluate and ship small medical vision-language models."""

__version__ = "0.1.0"
