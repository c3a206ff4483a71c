#!/usr/bin/env bash
# Base images for the compose files, built from Debian's archive: the path for machines
# that cannot reach Docker Hub (offline / air-gapped: point DEBIAN_MIRROR at a local mirror).
#
#   scripts/build_base_images.sh        # or: make base-images
#
# Builds, skipping each image that already exists (delete one to rebuild it):
#   speculators-base/debian:bookworm     debootstrap --variant=minbase, imported with `docker import`
#   speculators-base/python:bookworm     + python3 and python3-venv (Python 3.11) from Debian
#   speculators-base/redis:bookworm      + Debian's redis-server, run as the `redis` user
# then use them through the compose variables (README, docs/product.md):
#   SPEC_PYTHON_IMAGE=speculators-base/python:bookworm SPEC_REDIS_IMAGE=speculators-base/redis:bookworm
#
# Needs root (debootstrap), debootstrap and a running Docker engine.
# Settings: SUITE (bookworm), DEBIAN_MIRROR (http://deb.debian.org/debian),
#           BASE_PREFIX (speculators-base), DOCKER (docker).
set -euo pipefail

SUITE=${SUITE:-bookworm}
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
BASE_PREFIX=${BASE_PREFIX:-speculators-base}
DOCKER=${DOCKER:-docker}
DEBIAN_IMAGE="$BASE_PREFIX/debian:$SUITE"
PYTHON_IMAGE="$BASE_PREFIX/python:$SUITE"
REDIS_IMAGE="$BASE_PREFIX/redis:$SUITE"

exists() { "$DOCKER" image inspect "$1" >/dev/null 2>&1; }

if exists "$DEBIAN_IMAGE"; then
    echo "$DEBIAN_IMAGE exists"
else
    command -v debootstrap >/dev/null || { echo "error: debootstrap is not installed (apt-get install debootstrap)" >&2; exit 2; }
    [ "$(id -u)" = 0 ] || { echo "error: debootstrap needs root" >&2; exit 2; }
    root=$(mktemp -d /tmp/spec-rootfs.XXXXXX)
    trap 'rm -rf "$root"' EXIT
    echo "debootstrap --variant=minbase $SUITE from $DEBIAN_MIRROR (a few minutes)"
    debootstrap --variant=minbase "$SUITE" "$root" "$DEBIAN_MIRROR" >"$root.log" 2>&1 \
        || { tail -20 "$root.log" >&2; exit 1; }
    rm -f "$root.log"
    # what a container image does not need: package lists (apt-get update fetches them), caches
    rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/var/cache/apt/archives/*.deb
    tar -C "$root" -c . | "$DOCKER" import \
        -c 'ENV LANG=C.UTF-8 PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        -c 'CMD ["bash"]' - "$DEBIAN_IMAGE"
    rm -rf "$root"
    trap - EXIT
fi

# A Dockerfile on stdin: no build context is sent.
build() {
    local image=$1
    if exists "$image"; then
        echo "$image exists"
    else
        "$DOCKER" build -t "$image" -
    fi
}

build "$PYTHON_IMAGE" <<EOF
FROM $DEBIAN_IMAGE
RUN apt-get update \\
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \\
    && rm -rf /var/lib/apt/lists/*
EOF

build "$REDIS_IMAGE" <<EOF
FROM $DEBIAN_IMAGE
RUN apt-get update \\
    && apt-get install -y --no-install-recommends redis-server \\
    && rm -rf /var/lib/apt/lists/* \\
    && mkdir -p /data && chown redis:redis /data
WORKDIR /data
USER redis
EXPOSE 6379
CMD ["redis-server", "--protected-mode", "no"]
EOF

echo "base images ready: $DEBIAN_IMAGE $PYTHON_IMAGE $REDIS_IMAGE"
