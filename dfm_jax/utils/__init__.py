"""Small helpers with one job each: ``files`` (atomic writes), ``viz`` ([-1, 1] <-> uint8,
grids, previews, PNGs), ``names`` (closest names for mistyped fields)."""
