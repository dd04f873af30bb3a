"""Fed-Grow ClientApp: trains a private Local-LiGO and the shared Global-LiGO on private data."""
