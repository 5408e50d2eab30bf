"""Networks of Taming Transformers, with the official parameter names."""
