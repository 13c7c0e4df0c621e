"""Data: embedded toy data (mixtures, digits) and loaders for real runs."""
