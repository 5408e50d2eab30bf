"""gen1_video: Structure and Content-Guided Video Synthesis with Diffusion Models (Esser, Chiu, Atighehchian,
Granskog, Germanidis, 2023; Runway Gen-1).

A latent video diffusion model inflated from an image LDM (temporal convolutions and temporal attention added to
ldm's UNet, zero-initialised), conditioned on structure (depth blurred to a chosen level t_s, concatenated to the
latent) and content (an image embedding of one frame, cross-attended), sampled with classifier-free guidance on
content and temporal guidance between the video model and its frame-wise image mode.
"""

__version__ = "0.1.0"
