"""Networks of SD3: the MMDiT (and MMDiT-X), with the diffusers / original parameter layouts mapped."""
