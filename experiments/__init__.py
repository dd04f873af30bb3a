"""Fed-Grow against its baselines: run every mode of the app over seeds and Dirichlet alphas, tabulate, plot."""
