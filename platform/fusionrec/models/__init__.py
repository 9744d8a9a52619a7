"""Recommendation models behind one interface: FusionNeuMF and its baselines."""
