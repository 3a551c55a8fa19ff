"""Built-in real models (trained on data that ships inside packages)."""
from .digits import DigitsResNet, accuracy, load_digits_split, pretrained_digits_resnet, train_digits_resnet

__all__ = ["DigitsResNet", "accuracy", "load_digits_split", "pretrained_digits_resnet", "train_digits_resnet"]
