"""Towards Unified Keyframe Propagation Models (Esser, Michael, Sengupta, 2022, arXiv 2205.09731) on genlab's core:
guided inpainting of a target frame from keyframes with a global (latent attention) and a local (flow-guided) stream."""

__version__ = "0.1.0"
