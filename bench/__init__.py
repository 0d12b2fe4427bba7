"""``twotower bench``: servers and load generators as separate processes, ratios measured in one run."""
