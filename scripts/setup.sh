#!/bin/sh
# Set up a Debian 12 machine for mailpolicy: the Debian packages in scripts/debian-packages.txt
# (apt-get, only those missing), a virtualenv in .venv with the project and its test tools.
# Idempotent and quick when already done: apt-get runs only for missing packages, pip only when
# pyproject.toml changed since the last install.
set -eu
cd "$(dirname "$0")/.."

missing=""
for pkg in $(sed -e 's/#.*//' scripts/debian-packages.txt); do
    if ! dpkg-query -W -f='${Status}\n' "$pkg" 2>/dev/null | grep -q '^install ok installed$'; then
        missing="$missing $pkg"
    fi
done
if [ -n "$missing" ]; then
    if [ "$(id -u)" != 0 ]; then
        echo "setup: missing Debian packages:$missing (run as root, or install them)" >&2
        exit 1
    fi
    echo "setup: installing Debian packages:$missing"
    # Installing a daemon package must not start its system service (Exim on port 25 ...):
    # a policy-rc.d that says "no" while we install, removed again if we made it.
    made_policy_rc=""
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
        chmod 755 /usr/sbin/policy-rc.d
        made_policy_rc=yes
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q </dev/null
    # shellcheck disable=SC2086
    apt-get install -y -q --no-install-recommends $missing </dev/null
    [ -z "$made_policy_rc" ] || rm -f /usr/sbin/policy-rc.d
fi

if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
stamp=".venv/.installed-$(sha256sum pyproject.toml | cut -c1-16)"
if [ ! -e "$stamp" ]; then
    .venv/bin/python -m pip install -q --upgrade pip
    .venv/bin/python -m pip install -q -e '.[test,bench]'
    rm -f .venv/.installed-*
    touch "$stamp"
fi
