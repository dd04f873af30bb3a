"""The trust boundary: every reply checked, bounded and aggregated robustly; central DP on the shared tensors."""
