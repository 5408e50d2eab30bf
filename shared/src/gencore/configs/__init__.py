"""Shared Hydra config groups (``pkg://gencore.configs`` on every package's search path)."""
