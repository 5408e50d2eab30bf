"""ldm: High-Resolution Image Synthesis with Latent Diffusion Models (Rombach, Blattmann, Lorenz, Esser, Ommer,
CVPR 2022).

A DDPM runs in the latent space of a frozen KL- or VQ-regularised autoencoder; a UNet with cross-attention
(SpatialTransformer) conditions it on text, classes or layouts, and channel concatenation covers inpainting,
super-resolution and semantic synthesis. Stable Diffusion v1 is an LDM.
"""

__version__ = "0.1.0"
