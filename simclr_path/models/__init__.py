"""Models: timm backbones by name, projection heads, and the SimCLR model that joins them.

To add a backbone, nothing is needed here: any ``timm`` model name works (``--backbone``).
A new head goes in ``heads.py``.
"""

from simclr_path.models.backbones import check_backbone_name, create_backbone
from simclr_path.models.heads import ProjectionHead
from simclr_path.models.simclr import SimCLRModel

__all__ = ["ProjectionHead", "SimCLRModel", "check_backbone_name", "create_backbone"]
