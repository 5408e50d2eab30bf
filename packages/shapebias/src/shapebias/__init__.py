"""Shape or Texture: Understanding Discriminative Features in CNNs (Islam, Kowal, Esser, Jia, Ommer, Derpanis, Bruce;
ICLR 2021, arXiv 2101.11604) on genlab's core: cue-conflict image pairs that share shape or texture, the correlation
estimate of how many dimensions of a network's features encode each factor (per stage, per training epoch), and
per-pixel readouts of frozen features (binary shape masks against semantic masks)."""

__version__ = "0.1.0"
