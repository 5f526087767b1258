#!/usr/bin/env bash
# Builds packaging/Containerfile with a real container engine and runs the image it makes:
# the server starts as uid 10001 with the image's own config, a worker runs through the
# `roster` command line inside the container, and `docker stop` (SIGTERM) ends it with
# exit code 0.
#
#   bash packaging/build-image.sh            # the engine the `docker` CLI reaches
#   ROSTER_IMAGE_KEEP=1 bash packaging/build-image.sh   # keep the image afterwards
#
# The recipe's two base images come from Docker Hub. Where the engine has them or can pull
# them, they are used as they are. Where it cannot (a machine that reaches Debian's
# package mirror but no image registry, like the test machines), stand-ins are made from
# Debian's packages with mmdebstrap and given to the recipe as build arguments:
#   - the runtime stage's base: Debian bookworm, variant minbase;
#   - the build stage's base: the same with gcc and libc6-dev, plus the Rust toolchain and
#     the crate cache of the machine running this script (the toolchain the project is
#     tested with), so `cargo build --release --locked` runs inside the engine as written.
# The stand-ins' root file systems are cached under target/container-images/.
#
# The build's RUN steps use the host's network (`--network host`) to reach crates.io for
# any crate not in the cache; the container that is run has no network but its own
# loopback.
set -euo pipefail
cd "$(dirname "$0")/.."

cli=${ROSTER_CONTAINER_CLI:-docker}
image=roster-local/roster:check
name=roster-image-check-$$
cache=target/container-images
build_image=docker.io/library/rust:1-bookworm
base_image=docker.io/library/debian:bookworm-slim

have_image() { "$cli" image inspect "$1" >/dev/null 2>&1; }
pullable() { have_image "$1" || timeout 60 "$cli" pull -q "$1" >/dev/null 2>&1; }

stand_in() { # stand_in IMAGE TARBALL [mmdebstrap options…]
    local tag=$1 tar=$2
    shift 2
    if have_image "$tag"; then return; fi
    if [ ! -s "$tar" ]; then
        command -v mmdebstrap >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq mmdebstrap; }
        mkdir -p "$cache"
        echo "== mmdebstrap bookworm → $tar"
        mmdebstrap --quiet --variant=minbase --format=tar "$@" bookworm "$tar.part" http://deb.debian.org/debian
        mv "$tar.part" "$tar"
    fi
    "$cli" import --change 'ENV PATH=/opt/rust/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        "$tar" "$tag" >/dev/null
    echo "== $tag imported"
}

args=()
if pullable "$base_image"; then
    echo "== base image: $base_image"
else
    echo "== $base_image cannot be had here: a stand-in from Debian's packages"
    stand_in roster-local/debian:bookworm-slim "$cache/bookworm-minbase.tar"
    args+=(--build-arg BASE_IMAGE=roster-local/debian:bookworm-slim)
fi
if pullable "$build_image"; then
    echo "== build image: $build_image"
else
    echo "== $build_image cannot be had here: a stand-in with this machine's Rust toolchain"
    sysroot=$(rustc --print sysroot)
    cargo_home=${CARGO_HOME:-$HOME/.cargo}
    hooks=(--include=gcc,libc6-dev,ca-certificates
        --customize-hook="mkdir -p \"\$1/opt/rust\" \"\$1/root/.cargo\""
        --customize-hook="tar -C '$sysroot' -c . | tar -C \"\$1/opt/rust\" -x")
    if [ -d "$cargo_home/registry" ]; then
        hooks+=(--customize-hook="tar -C '$cargo_home' -c registry | tar -C \"\$1/root/.cargo\" -x")
    fi
    stand_in roster-local/rust:bookworm "$cache/bookworm-rust-$(rustc --version | awk '{print $2}').tar" "${hooks[@]}"
    args+=(--build-arg BUILD_IMAGE=roster-local/rust:bookworm)
fi

echo "== $cli build -f packaging/Containerfile -t $image ${args[*]} ."
"$cli" build -q --network host -f packaging/Containerfile -t "$image" "${args[@]}" . >/dev/null

cleanup() {
    "$cli" rm -f "$name" >/dev/null 2>&1 || true
    if [ -z "${ROSTER_IMAGE_KEEP:-}" ]; then "$cli" image rm -f "$image" >/dev/null 2>&1 || true; fi
}
trap cleanup EXIT
fail() {
    echo "build-image: $*" >&2
    "$cli" logs "$name" 2>&1 | tail -n 20 >&2 || true
    exit 1
}

token=build-image-check-token-0123456789
"$cli" run -d --name "$name" --network none -e ROSTER_TOKEN="$token" "$image" >/dev/null
in_container() { "$cli" exec -e ROSTER_TOKEN="$token" "$name" "$@"; }

for _ in $(seq 1 100); do
    if in_container roster runtimes >/dev/null 2>&1; then break; fi
    sleep 0.2
done
echo "== roster runtimes (inside the container)"
in_container roster runtimes || fail "the server in the image does not answer"

uid=$(in_container sh -c 'awk "/^Uid:/ {print \$2}" /proc/1/status')
[ "$uid" = 10001 ] || fail "the server runs as uid $uid, not 10001"
echo "== the server runs as uid $uid"

echo "== roster spawn --profile shell -f -- 'echo hello from the image; exit 3'"
set +e
out=$(in_container roster spawn --profile shell -f -- 'echo hello from the image; exit 3')
code=$?
set -e
[ "$out" = "hello from the image" ] || fail "the worker wrote '$out'"
[ "$code" = 3 ] || fail "spawn -f exited with $code, not the worker's 3"

echo "== $cli stop (SIGTERM)"
"$cli" stop -t 20 "$name" >/dev/null
exit_code=$("$cli" inspect --format '{{.State.ExitCode}}' "$name")
[ "$exit_code" = 0 ] || fail "the server exited with $exit_code after SIGTERM, not 0"
echo "build-image: ok"
