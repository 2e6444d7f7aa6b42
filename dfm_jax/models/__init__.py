"""Neural networks: the DFM-DiT and its building blocks."""
