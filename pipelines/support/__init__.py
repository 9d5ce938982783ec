"""What several stages share: params loading, Ray cluster and jobs, tracking, checkpoints, fetch, gate, plots.

Kept import-free on purpose: a stage's DVC deps are the files it really imports (tests/system/test_dvc_deps.py).
"""
