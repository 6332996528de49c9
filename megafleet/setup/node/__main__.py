"""`python -m megafleet.setup.node probe|plan [options]`: the node agent by hand, in this process.

Needs only the standard library (no click, rich or paramiko), so it runs from a checkout with
any Python >= 3.8 on a GPU machine, e.g. to record what the TE build planning finds:
    python -m megafleet.setup.node plan --venv /opt/torch/.venv --with-te > plan.json
Prints one JSON document: {"facts": {...}, "steps": [...]} (plan) or {"facts": {...}} (probe).
`megafleet setup --local --dry-run` shows the same plan through the operator.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m megafleet.setup.node")
    p.add_argument("mode", choices=("probe", "plan"))
    p.add_argument("--venv", default=None, help="default: ~/megafleet/venv")
    p.add_argument("--with-te", action="store_true")
    p.add_argument("--with-apex", action="store_true")
    p.add_argument("--with-flash-attn", action="store_true")
    p.add_argument("--base-python", default="python3")
    p.add_argument("--installer", default="auto", choices=("auto", "uv", "pip"))
    p.add_argument("--max-jobs", type=int, default=None)
    args = p.parse_args(argv)

    import hashlib

    from megafleet.setup.node import CHECK
    from megafleet.setup.node.agent import plan, probe
    from megafleet.setup.node.context import Ctx
    from megafleet.setup.node.core import Redactor
    from megafleet.setup.request import SetupOptions, build_request
    from megafleet.setup.wheel import wheel_bytes, wheel_name

    options = SetupOptions(
        with_te=args.with_te,
        with_apex=args.with_apex,
        with_flash_attn=args.with_flash_attn,
        base_python=args.base_python,
        installer=args.installer,
        max_jobs=args.max_jobs,
    )
    if args.venv:
        options.venv = args.venv
    options.validate()
    wheel = {"name": wheel_name(), "sha256": hashlib.sha256(wheel_bytes()).hexdigest()}
    req = build_request(options, args.mode, wheel)
    ctx = Ctx(req, Redactor(dict(os.environ), CHECK.SECRET_NAME))
    doc = {"facts": probe(ctx, False)}
    if args.mode == "plan":
        doc["steps"] = plan(ctx)
    json.dump(doc, sys.stdout, indent=2, sort_keys=True)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
