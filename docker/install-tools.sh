#!/usr/bin/env bash
# Install what building and smoke-running the CPU image needs: podman (build, create, mount) and
# debootstrap (the Debian base, so no registry is needed). Idempotent: does nothing when both are
# there. Used by docker/build-cpu-image.sh and by .ci/run.
set -euo pipefail

missing=()
command -v podman >/dev/null || missing+=(podman)
command -v debootstrap >/dev/null || missing+=(debootstrap)
[ ${#missing[@]} -eq 0 ] && exit 0

# Not root: nothing to install with, and nothing to build with either (debootstrap, mount and
# chroot need root), so tests/e2e/test_docker.py skips its image test. Say so and carry on.
if [ "$(id -u)" -ne 0 ]; then
    echo "install-tools: ${missing[*]} missing and not root: the CPU image cannot be built here" >&2
    exit 0
fi
command -v apt-get >/dev/null || { echo "install-tools: no apt-get to install ${missing[*]}" >&2; exit 1; }

# --no-install-recommends: podman's recommends (rootless networking, fuse-overlayfs, buildah...)
# are not needed to build as root with --isolation=chroot.
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
