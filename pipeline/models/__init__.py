"""Models: the DenseNet family (thesis DenseNet-40) and the MNIST MLP."""
from pipeline.models.densenet import DenseNet
from pipeline.models.dropout import MaskedDropout, dropout_masks
from pipeline.models.mlp import MLP

__all__ = ["DenseNet", "MLP", "MaskedDropout", "dropout_masks"]
