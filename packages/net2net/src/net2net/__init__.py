"""A Note on Data Biases in Generative Models (Esser, Rombach, Ommer, 2020, arXiv 2012.02516) on genlab's core: a
conditional invertible network (cINN) over the latents of one frozen autoencoder trained on a union of datasets,
conditioned on the dataset label; inverting with another label projects an image onto another dataset."""

__version__ = "0.1.0"
