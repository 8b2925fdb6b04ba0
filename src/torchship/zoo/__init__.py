"""Reference models: digits CNN and MLP (trained offline), ResNet-18, a control-flow model."""

from torchship.zoo.control_flow import ControlFlowNet
from torchship.zoo.digits import DigitsCNN, DigitsMLP, load_digits_split, train
from torchship.zoo.resnet import ResNet18

__all__ = ["ControlFlowNet", "DigitsCNN", "DigitsMLP", "ResNet18", "load_digits_split", "train"]
