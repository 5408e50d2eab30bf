"""ladd_turbo: Fast High-Resolution Image Synthesis with Latent Adversarial Diffusion Distillation (Sauer, Boesel,
Dockhorn, Blattmann, Esser, Rombach, 2024; SD3-Turbo).

A few-step student (an sd3_flow MMDiT initialised from the teacher) trained only adversarially on the teacher's own
guided samples, against a discriminator made of lightweight heads on the frozen teacher's features of re-noised
latents; it samples in 4 unguided Euler steps.
"""

__version__ = "0.1.0"
