"""ctm_core: Consistency Trajectory Models on EDM teachers, as a plain PyTorch library.

Importing this package touches no disk, network or tracking server.
"""
