"""Training: loss, optimizer, train state and the jitted train step."""
