#!/bin/sh
# The runtime stage of packaging/Containerfile: installs the roster binary, its user and
# its directories under ROOT (/ in the image). packaging/check-container.sh runs the same
# steps under a temporary directory, so they are exercised without a container engine.
#
#   ROOT=/ sh container-setup.sh /path/to/roster
set -eu
ROOT=${ROOT:-/}
BIN=$1
UID_=10001
GID_=10001

install -d -m 0755 "$ROOT/usr/local/bin" "$ROOT/etc/roster"
install -m 0755 "$BIN" "$ROOT/usr/local/bin/roster"

# A user of its own, no login, no password; its home is the state directory.
touch "$ROOT/etc/passwd" "$ROOT/etc/group"
grep -q '^roster:' "$ROOT/etc/group" || echo "roster:x:$GID_:" >>"$ROOT/etc/group"
grep -q '^roster:' "$ROOT/etc/passwd" ||
    echo "roster:x:$UID_:$GID_:roster:/var/lib/roster:/usr/sbin/nologin" >>"$ROOT/etc/passwd"

# The state directory (the id key lives here: mount a volume on it so ids survive).
install -d -m 0700 "$ROOT/var/lib/roster"
chown "$UID_:$GID_" "$ROOT/var/lib/roster"

# The default config: every address of the container, so a token is required; it is read
# from ROSTER_TOKEN at start (`docker run -e ROSTER_TOKEN=…`).
cat >"$ROOT/etc/roster/roster.toml" <<'TOML'
[server]
listen = "0.0.0.0:7411"
state_dir = "/var/lib/roster"

[[server.tokens]]
name = "operator"
scope = "operate"
token_env = "ROSTER_TOKEN"

[[runtimes]]
name = "local"
source = "embedded"
[runtimes.profiles.shell]
command = ["/bin/sh", "-c"]
TOML
chmod 0644 "$ROOT/etc/roster/roster.toml"
