"""Generation-quality and detection metrics."""
