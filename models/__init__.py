"""Small model builders, built from code and configs: nothing is downloaded."""

from .classifiers import BUILDERS, ConvNet1d, GRUClassifier, ResidualMLP, build_classifier, logistic

__all__ = ["BUILDERS", "build_classifier", "logistic", "ResidualMLP", "ConvNet1d", "GRUClassifier"]
