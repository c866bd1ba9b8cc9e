"""LightningModules: image classification and language modelling."""

from sift_lightning.modules._optim import OptimConfig
from sift_lightning.modules.classifier import ImageClassifier
from sift_lightning.modules.language_model import LanguageModel

__all__ = ["ImageClassifier", "LanguageModel", "OptimConfig"]
