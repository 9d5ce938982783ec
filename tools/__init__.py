"""Developer tools run from the repository root (e.g. `python tools/dvc_deps.py --check`); a package so tests can
import them."""
