"""Thin pipeline entrypoints (DVC stages) around `ctm_core`.

Each stage module parses its CLI, loads `params.yaml` through `ctm_core.config` and calls one library function.
Only this package may import ray, mlflow, dvc or boto3 (boto3 lazily, inside `pipelines.support.fetch`). Importing
it touches no disk or network.
"""

from __future__ import annotations
