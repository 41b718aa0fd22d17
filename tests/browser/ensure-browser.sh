#!/usr/bin/env bash
# Make sure the browser tests can run: Debian's chromium at /usr/bin/chromium (Playwright
# drives it; Playwright's own browser download is not used), node (for `node --test
# clients/js/test/`) and npm (tests/js packs the JS client). Installs what is missing with apt-get when we are root (or have
# password-less sudo); otherwise says what to do. Exit 0 = all are there.
set -euo pipefail

missing=()
[ -x /usr/bin/chromium ] || missing+=(chromium)
command -v node >/dev/null 2>&1 || missing+=(nodejs)
command -v npm >/dev/null 2>&1 || missing+=(npm)
[ ${#missing[@]} -eq 0 ] && exit 0

if [ "$(id -u)" -eq 0 ]; then
    SUDO=""
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    SUDO="sudo -n"
else
    echo "missing for the browser tests: ${missing[*]}, and I cannot install them (not root, no password-less sudo)." >&2
    echo "Install them, then re-run: sudo apt-get install ${missing[*]}" >&2
    exit 1
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "missing for the browser tests: ${missing[*]}; no apt-get here: install them yourself (chromium at /usr/bin/chromium)." >&2
    exit 1
fi

echo "installing ${missing[*]} for the browser tests …"
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
[ -x /usr/bin/chromium ] && command -v node >/dev/null 2>&1 && command -v npm >/dev/null 2>&1 || {
    echo "installing ${missing[*]} failed: install them yourself, then re-run." >&2
    exit 1
}
echo "installed ${missing[*]}."
