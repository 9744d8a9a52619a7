"""Text and image encoders (offline), their preparation, and the Ray Data encode pipeline."""
