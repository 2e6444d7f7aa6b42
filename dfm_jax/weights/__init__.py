"""Importers of external checkpoints (safetensors files, torch state dicts read safely)."""
