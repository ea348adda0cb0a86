"""ptpipe: the PyTorch tutorial's CIFAR-10 CNN and Alice char-LSTM as a DVC + Prefect pipeline."""

__version__ = "0.1.0"
