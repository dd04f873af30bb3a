"""Persistence: the run's checkpoint (Global-LiGO, strategy state, RNGs, round log) and its resumption."""
