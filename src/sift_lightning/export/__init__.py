"""Train sparse, ship dense: fold (``folding.py``), CSR sparse export (``csr.py``) and checkpoints
(``checkpoint.py``). See ``folding.py`` for the maths."""

from sift_lightning.export.checkpoint import export_checkpoint, export_main, format_summary
from sift_lightning.export.csr import CSRConv2d, CSRLinear, LayerDecision, sparse_export
from sift_lightning.export.folding import dense_state_dict, fold

__all__ = [
    "CSRConv2d",
    "CSRLinear",
    "LayerDecision",
    "dense_state_dict",
    "export_checkpoint",
    "export_main",
    "fold",
    "format_summary",
    "sparse_export",
]
