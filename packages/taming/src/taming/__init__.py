"""taming: Taming Transformers for High-Resolution Image Synthesis (Esser, Rombach, Ommer, CVPR 2021).

VQGAN (a VQ autoencoder trained with L1 + perceptual + patch-adversarial losses) turns images into a grid of codebook
indices; a GPT over those indices (Net2NetTransformer) generates images, unconditionally or conditioned on a class or
on the codes of a second VQGAN (edges, low resolution, depth, segmentation).
"""

__version__ = "0.1.0"
