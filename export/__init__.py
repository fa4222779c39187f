"""Hand a run's weights on to timm and open_clip (`python -m export timm|open_clip --run ... --out ...`)."""
