#!/usr/bin/env bash
# Make sure the operations tests can run: `systemd-analyze` (package systemd) checks the
# rendered units (tests/ops/test_systemd.py). Installs it with apt-get when we are root (or
# have password-less sudo); otherwise says what to do. Exit 0 = it is there.
# promtool (package prometheus, ~100 MB) is not installed here: tests/ops uses it when it
# is present and checks the rules with its own parser otherwise.
set -euo pipefail

command -v systemd-analyze >/dev/null 2>&1 && exit 0

if [ "$(id -u)" -eq 0 ]; then
    SUDO=""
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    SUDO="sudo -n"
else
    echo "missing for the operations tests: systemd-analyze, and I cannot install it (not root, no password-less sudo)." >&2
    echo "Install it, then re-run: sudo apt-get install systemd" >&2
    exit 1
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "missing for the operations tests: systemd-analyze; no apt-get here: install systemd yourself." >&2
    exit 1
fi

echo "installing systemd (systemd-analyze) for the operations tests …"
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends systemd
command -v systemd-analyze >/dev/null 2>&1 || {
    echo "installing systemd failed: install it yourself, then re-run." >&2
    exit 1
}
echo "installed systemd-analyze."
