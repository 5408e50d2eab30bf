"""Networks of Latent Diffusion, with the official parameter names."""
