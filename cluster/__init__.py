"""Where things run: planning (pure), placement groups and actor start-up, local test clusters.
Never touches tensors."""
