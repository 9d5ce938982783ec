"""Check or show `params.yaml` from the command line (the schema is `ctm_core.config`).

Examples:
    python -m pipelines.config --check                     # OK / one-line error, exit code 2
    python -m pipelines.config --check --set distill.K=18  # try an override
    python -m pipelines.config --show distill              # resolved section as JSON + its params_hash
    python -m pipelines.config --preset cifar10-uncond     # write a paper recipe into params.yaml (docs/presets.md)
    python -m pipelines.config --preset cifar10-cond --set data.path=/data/cifar-10-python.tar.gz
    python -m pipelines.config --preset imagenet64-cond --check   # validate the result, write nothing
    python -m pipelines.config --list-presets
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from ctm_core.config import Params, ParamsError, params_hash, parse_yaml
from pipelines.support.params import load_params


def _main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipelines.config", description=__doc__.split("\n\n")[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--check", action="store_true", help="validate and print OK or the one-line error (exit 2)")
    ap.add_argument("--show", metavar="SECTION", help="print the resolved section as JSON with its params_hash")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override (YAML value)")
    ap.add_argument("--no-env", action="store_true", help="skip GPU / S3 / Ray-address checks")
    ap.add_argument("--preset", metavar="NAME", help="apply presets/NAME.yaml (+ --set) to --params, validated, atomic")
    ap.add_argument("--list-presets", action="store_true", help="print the preset names")
    args = ap.parse_args(argv)
    if args.list_presets:
        from pipelines.support.presets import list_presets

        print("\n".join(list_presets()))
        return 0
    overrides: dict[str, Any] = {}
    for item in args.set:
        if "=" not in item:
            print(f"--set: expected KEY=VALUE, got {item[:80]!r}", file=sys.stderr)
            return 2
    try:
        for item in args.set:
            key, _, value = item.partition("=")
            overrides[key.strip()] = parse_yaml(value, key.strip(), f"--set {key.strip()}")
        if args.preset:
            from pipelines.support.presets import apply_preset, preset_params

            if args.check or args.show:  # validate (and show) the result without writing it
                params, _ = preset_params(args.params, args.preset, overrides, check_env=not args.no_env)
            else:
                apply_preset(args.params, args.preset, overrides, check_env=not args.no_env)
                print(f"wrote {args.params} with preset {args.preset}")
                return 0
        else:
            params = load_params(args.params, overrides, check_env=not args.no_env)
    except ParamsError as e:
        print(f"params error: {e}", file=sys.stderr)
        return 2
    if args.show:
        if args.show not in Params.model_fields:
            print(f"--show: expected one of {', '.join(Params.model_fields)}, got {args.show[:80]!r}", file=sys.stderr)
            return 2
        sec = params.section(args.show)
        print(json.dumps({"params_hash": params_hash(sec), args.show: sec}, indent=2))
    else:
        print("OK")
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
