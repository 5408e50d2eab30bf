"""Geometry-Free View Synthesis (Rombach, Esser, Ommer, ICCV 2021, arXiv 2104.07652) on genlab's core."""

__version__ = "0.1.0"
