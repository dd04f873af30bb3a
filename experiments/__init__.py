"""Issue 5's comparison: run every mode of the app over seeds and Dirichlet alphas, tabulate, plot."""
