"""`python -m deploy render|systemd|run|start|stop|status|logs|ctl …` (the Makefile's targets).

Settings come from the environment like the apps' (`BASE_PORT`, `VAR_DIR`, `NATS_CLUSTER`,
`GATEWAY_PROCS`, `API_PROCS`, `APP_ENV`, …); see shared/settings.py.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from deploy import stack
from deploy.production import render_systemd
from deploy.render import Layout, render
from shared.natsio import ensure_dev_credentials
from shared.settings import load


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deploy", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("render", help="write the configs under VAR_DIR and print where")
    p = sub.add_parser(
        "systemd",
        help="write systemd units, their environment file and an nginx snippet for a "
        "production host (deploy/README.md)",
    )
    p.add_argument("--out", type=Path, help="directory (default: VAR_DIR/systemd)")
    p.add_argument("--user", default="natsgate", help="the user the services run as")
    p.add_argument("--env-dir", type=Path, default=Path("/etc/natsgate"))
    for name, text in (("run", "foreground; Ctrl-C stops"), ("start", "background")):
        p = sub.add_parser(name, help=f"bring the whole stack up ({text})")
        p.add_argument(
            "--timeout",
            type=float,
            default=30.0,
            help="seconds from supervisord's start until ready (default 30)",
        )
    sub.add_parser("stop", help="stop the stack; nothing of it is left running")
    sub.add_parser("status", help="programs and readiness (exit 3: not running)")
    sub.add_parser("logs", help="follow every log of the stack")
    p = sub.add_parser("ctl", help="supervisorctl on this stack's config")
    p.add_argument("args", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)

    settings = load()
    layout = Layout.of(settings)
    try:
        match args.command:
            case "render":
                ensure_dev_credentials(settings)  # as `start` does: NATS users in the config
                render(settings, layout)
                print(layout.supervisord_conf)
                return 0
            case "systemd":
                for path in render_systemd(
                    settings,
                    layout,
                    args.out or layout.var / "systemd",
                    user=args.user,
                    env_dir=args.env_dir,
                ):
                    print(path)
                return 0
            case "run":
                return stack.run(settings, layout, args.timeout)
            case "start":
                return stack.start(settings, layout, args.timeout)
            case "stop":
                return stack.stop(layout)
            case "status":
                return stack.status(settings, layout)
            case "logs":
                return stack.logs(layout)
            case "ctl":
                return stack.ctl(layout, args.args)
    except stack.StackError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 2


if __name__ == "__main__":
    sys.exit(main())
