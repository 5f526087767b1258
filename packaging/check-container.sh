#!/usr/bin/env bash
# Runs packaging/Containerfile's steps without a container engine: the same cargo build
# command (unless ROSTER_BIN names a binary already built), then container-setup.sh under
# a temporary root, then checks what it made and runs the installed binary as the image's
# user (uid 10001): --version, and check-config on the image's config.
#
#   bash packaging/check-container.sh            # release build, as the image does
#   ROSTER_BIN=target/debug/roster bash packaging/check-container.sh
set -euo pipefail
cd "$(dirname "$0")/.."

if [ -z "${ROSTER_BIN:-}" ]; then
    cmd=$(sed -n 's/^RUN \(cargo build .*\)$/\1/p' packaging/Containerfile)
    echo "== $cmd"
    $cmd
    ROSTER_BIN=target/release/roster
fi

root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
chmod 0755 "$root"
echo "== ROOT=$root sh packaging/container-setup.sh $ROSTER_BIN"
ROOT=$root sh packaging/container-setup.sh "$ROSTER_BIN"

fail() { echo "check-container: $*" >&2; exit 1; }
[ -x "$root/usr/local/bin/roster" ] || fail "the binary is not installed"
grep -q '^roster:x:10001:10001:' "$root/etc/passwd" || fail "no roster user in /etc/passwd"
[ "$(stat -c '%u:%g %a' "$root/var/lib/roster")" = "10001:10001 700" ] ||
    fail "the state directory is $(stat -c '%u:%g %a' "$root/var/lib/roster"), not 10001:10001 700"

as_user=()
if [ "$(id -u)" = 0 ] && command -v setpriv >/dev/null; then
    as_user=(setpriv --reuid 10001 --regid 10001 --clear-groups)
else
    echo "== not root (or no setpriv): running the binary as $(id -un), not as uid 10001"
fi
echo "== roster --version"
"${as_user[@]}" "$root/usr/local/bin/roster" --version
# The image's config names /var/lib/roster; check it with the temporary root's instead.
sed "s|/var/lib/roster|$root/var/lib/roster|" "$root/etc/roster/roster.toml" >"$root/check.toml"
chmod 0644 "$root/check.toml"
echo "== roster check-config (the image's config, as uid 10001)"
ROSTER_TOKEN=check-container-token "${as_user[@]}" "$root/usr/local/bin/roster" check-config "$root/check.toml"
echo "check-container: ok"
