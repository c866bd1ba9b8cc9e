"""sift_lightning: Sparse Iso-FLOP Transformations (Sparse-IFT) for PyTorch Lightning."""

from sift_lightning.callback import SparsityCallback, SupportsTransform
from sift_lightning.export import dense_state_dict, export_checkpoint, fold, sparse_export
from sift_lightning.flops import FlopReport, count_flops
from sift_lightning.models.backbones import create_backbone
from sift_lightning.models.gpt import GPT, GPTConfig, gpt_config
from sift_lightning.modules import ImageClassifier, LanguageModel, OptimConfig
from sift_lightning.sparse.engine import DynamicSparsity
from sift_lightning.sparse.masks import SparseOwner, mark_sparse, sparse_targets
from sift_lightning.sparse.settings import SparsitySettings
from sift_lightning.transforms import FAMILIES, MEMBERS, transform

__all__ = [
    "FAMILIES",
    "MEMBERS",
    "FlopReport",
    "GPT",
    "GPTConfig",
    "ImageClassifier",
    "LanguageModel",
    "OptimConfig",
    "SparseOwner",
    "SparsityCallback",
    "SupportsTransform",
    "DynamicSparsity",
    "SparsitySettings",
    "count_flops",
    "create_backbone",
    "dense_state_dict",
    "export_checkpoint",
    "fold",
    "gpt_config",
    "mark_sparse",
    "sparse_export",
    "sparse_targets",
    "transform",
]
__version__ = "0.1.0"
