"""Artifacts on disk: the one safetensors + JSON + sha256 folder format, the safe EDM snapshot reader, teacher and
student folders, sha256 helpers."""
