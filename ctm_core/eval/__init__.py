"""Evaluation: Fréchet distance / KID with error bars, the FID Inception-v3, the small feature classifier."""
