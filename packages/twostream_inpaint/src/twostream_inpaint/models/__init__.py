"""Networks of the two-stream keyframe propagation model: the generator and LaMa's patch discriminator."""

from .discriminator import NLayerDiscriminator
from .generator import GIResNetGenerator, KeyframeState

__all__ = ["GIResNetGenerator", "KeyframeState", "NLayerDiscriminator"]
