"""Losses. ``ntxent``: SimCLR's NT-Xent with negatives gathered from every rank.

A new loss is an ``nn.Module`` in its own file here, taking the two views' projections.
"""

from simclr_path.losses.ntxent import NTXentLoss, at_least_fp32

__all__ = ["NTXentLoss", "at_least_fp32"]
