"""fusionrec: a multimodal recommender platform on Ray."""

__version__ = "0.1.0"
