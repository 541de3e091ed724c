"""Small model builders, built from code and configs: nothing is downloaded."""

from .classifiers import BUILDERS, ConvNet1d, GRUClassifier, ResidualMLP, build_classifier, logistic
from .lm import bpe_tokenizer, tiny_causal_lm, word_level_tokenizer

__all__ = ["BUILDERS", "build_classifier", "logistic", "ResidualMLP", "ConvNet1d", "GRUClassifier",
           "tiny_causal_lm", "word_level_tokenizer", "bpe_tokenizer"]
