"""The CTM authors' released networks: the sony/ctm ImageNet-64 ADM student and ADM's noisy classifier in their own
key layouts, the ctm-cifar10 student, and the loader of their checkpoints (docs/official.md)."""
