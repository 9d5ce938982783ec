"""Artifacts on disk: the safe EDM snapshot reader and the project's teacher/student folder formats."""
