"""galaxy_tune."""
