"""ImageBART (Esser, Rombach, Blattmann, Ommer, NeurIPS 2021, arXiv 2108.08827): bidirectional context with
multinomial diffusion for autoregressive image synthesis, over the tokens of a taming VQGAN."""

__version__ = "0.1.0"
