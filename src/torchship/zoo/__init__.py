"""Reference models: digits CNN and MLP (trained offline), ResNet-18, a control-flow model."""

from torchship.zoo.digits import DigitsCNN, DigitsMLP, load_digits_split, train

__all__ = ["DigitsCNN", "DigitsMLP", "load_digits_split", "train"]
