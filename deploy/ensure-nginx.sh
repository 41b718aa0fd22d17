#!/usr/bin/env bash
# Make sure an nginx binary exists (the stack runs its own private instance of it).
# Installs it with the system package manager when missing and we are root (or have
# password-less sudo); otherwise says clearly what to do. Exit 0 = nginx is there.
set -euo pipefail

# Where deploy/render.py's nginx_binary() looks, in the same order.
have_nginx() {
    local candidate
    for candidate in "$(command -v nginx 2>/dev/null || true)" /usr/sbin/nginx \
        /usr/local/sbin/nginx /opt/homebrew/bin/nginx; do
        if [ -n "$candidate" ] && [ -x "$candidate" ]; then
            return 0
        fi
    done
    return 1
}

if have_nginx; then
    exit 0
fi

if [ "$(id -u)" -eq 0 ]; then
    SUDO=""
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    SUDO="sudo -n"
else
    echo "nginx is not installed and I cannot install it (not root, no password-less sudo)." >&2
    echo "Install it, then re-run: sudo apt-get install nginx  |  sudo dnf install nginx  |  brew install nginx" >&2
    exit 1
fi

echo "nginx is not installed: installing it with the system package manager …"
if command -v apt-get >/dev/null 2>&1; then
    # The stack runs its own nginx instance; the distro service (port 80) is not used.
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nginx
elif command -v dnf >/dev/null 2>&1; then
    $SUDO dnf install -y -q nginx
elif command -v apk >/dev/null 2>&1; then
    $SUDO apk add --quiet nginx
else
    echo "nginx is not installed and no known package manager (apt-get, dnf, apk) was found." >&2
    echo "Install nginx yourself, then re-run." >&2
    exit 1
fi

if have_nginx; then
    echo "nginx installed."
else
    echo "nginx installation failed: install it yourself, then re-run." >&2
    exit 1
fi
