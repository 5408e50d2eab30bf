"""sd3_flow: Scaling Rectified Flow Transformers for High-Resolution Image Synthesis (Esser et al., ICML 2024).

Rectified flow (straight data-noise paths, velocity prediction) with timestep densities biased toward the middle of the
path, and the MMDiT: separate weights for image and text tokens joined by one attention.
"""

__version__ = "0.1.0"
