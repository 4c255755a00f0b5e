"""GPU workers: the job functions, the models (GEM, LAVT) and heatmap-to-region conversion."""
