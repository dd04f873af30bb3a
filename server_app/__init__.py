"""Fed-Grow ServerApp: builds the Global-LiGO from the config, runs a strategy over it."""
