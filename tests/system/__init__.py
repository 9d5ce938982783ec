"""System tests: the whole pipeline (dvc repro), fault injection, Ray job submit, S3 server, infra configs."""
