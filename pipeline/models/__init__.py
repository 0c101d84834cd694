"""Models: the DenseNet family (thesis DenseNet-40) and the MNIST MLP."""
from pipeline.models.densenet import DenseNet, build_densenet
from pipeline.models.dropout import MaskedDropout, dropout_masks
from pipeline.models.mlp import MLP

__all__ = ["DenseNet", "build_densenet", "MLP", "MaskedDropout", "dropout_masks"]
