"""``python -m sift_lightning.flops MODEL``: the iso-FLOP table of every Sparse-IFT member."""

from sift_lightning.flops.table import main

main()
