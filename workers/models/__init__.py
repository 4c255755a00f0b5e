"""Model families: one factory per family, one place that resolves weights, plain modules."""
