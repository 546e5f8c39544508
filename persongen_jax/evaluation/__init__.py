"""Evaluation metrics: CLIP-T (text-image agreement) and, later, Face-Sim."""
