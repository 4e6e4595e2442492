#!/usr/bin/env bash
# Build the CPU image (docker/Dockerfile.cpu) on this machine with podman, without a registry:
# the base is a Debian bookworm made by debootstrap (once, cached) and imported into podman.
# Prints the image id as the last line of stdout; the build log goes to stderr.
#   docker/build-cpu-image.sh             # -> megatron-lite:cpu
#   IMAGE=my:tag docker/build-cpu-image.sh
# Needs root (debootstrap, podman's root storage). Idempotent: a second run only rebuilds the
# layers whose inputs changed.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
IMAGE=${IMAGE:-megatron-lite:cpu}
BASE_IMAGE=${BASE_IMAGE:-localhost/megatron-lite-base:bookworm}
ROOTFS=${ROOTFS:-${XDG_CACHE_HOME:-$HOME/.cache}/megatron_lite/bookworm-rootfs}

log() { echo "build-cpu-image: $*" >&2; }

[ "$(id -u)" -eq 0 ] || { log "run as root (debootstrap, podman's root storage)"; exit 1; }
"$ROOT/docker/install-tools.sh"

# One build at a time (two test runs at once would debootstrap into the same directory).
mkdir -p "$(dirname "$ROOTFS")"
exec 9>"$(dirname "$ROOTFS")/build-cpu-image.lock"
flock 9

# The Debian mirror this machine's apt uses (deb822 .sources or one-line sources.list), so the base
# comes from where apt already works here; MIRROR=... overrides.
debian_mirror() {
    local uri
    uri=$(cat /etc/apt/sources.list.d/*.sources 2>/dev/null \
        | sed -nE 's#^URIs:[[:space:]]*(\S+/debian)/?([[:space:]].*)?$#\1#p' | head -n1)
    [ -n "$uri" ] || uri=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null \
        | sed -nE 's#^deb[[:space:]]+(\[[^]]*\][[:space:]]+)?(\S+/debian)/?[[:space:]].*#\2#p' | head -n1)
    echo "${uri:-http://deb.debian.org/debian}"
}

# 1. The base rootfs, made once. Built in a temporary directory and renamed when complete, so an
#    interrupted debootstrap is never mistaken for a finished one.
fresh_rootfs=
if [ ! -f "$ROOTFS/.complete" ]; then
    mirror=${MIRROR:-$(debian_mirror)}
    log "debootstrap bookworm from $mirror into $ROOTFS"
    rm -rf "$ROOTFS.tmp" "$ROOTFS"
    debootstrap --variant=minbase bookworm "$ROOTFS.tmp" "$mirror" >&2
    # The image's first RUN does its own apt-get update: the package lists and .debs are dead weight.
    rm -rf "$ROOTFS.tmp"/var/lib/apt/lists/* "$ROOTFS.tmp"/var/cache/apt/archives/*.deb
    touch "$ROOTFS.tmp/.complete"
    mv "$ROOTFS.tmp" "$ROOTFS"
    fresh_rootfs=1
fi

# 2. The base image, imported from a new rootfs or when podman lacks it (`podman system reset`).
if [ -n "$fresh_rootfs" ] || ! podman image exists "$BASE_IMAGE"; then
    log "importing $ROOTFS as $BASE_IMAGE"
    tar --numeric-owner --exclude=./.complete -C "$ROOTFS" -c . | podman import - "$BASE_IMAGE" >&2
fi

# 3. Where and how this machine's pip gets packages (index, extra indexes, local wheel directories,
#    the CA bundle of a TLS-intercepting proxy), handed to the build so the image gets the same
#    wheels as `make install` here. Only the RUN steps see it, read-only: a pip.conf bind-mounted
#    at /etc/pip.conf and every local path it names bind-mounted under $HOST_PIP (the pip.conf is
#    rewritten to match). The Dockerfile stays a plain one that builds anywhere; what stays behind
#    in the image is podman's empty mount points (an empty /etc/pip.conf, empty dirs in $HOST_PIP).
HOST_PIP=/tmp/host-pip
build_args=()
index_url=
host_pip=("$ROOT/.venv/bin/python" -m pip)
[ -x "${host_pip[0]}" ] || host_pip=(python3 -m pip)
pip_settings=$("${host_pip[@]}" config list 2>/dev/null \
    | sed -nE "s/^[^.]*\.(index-url|extra-index-url|find-links|trusted-host|cert)='(.*)'$/\1 = \2/p" \
    | awk '!seen[$1]++' || true)  # `pip config list` puts :env: (which wins in pip) before files
if [ -n "$pip_settings" ]; then
    declare -A mounted=()
    conf=("[global]")
    while read -r key _eq values; do
        words=()
        for word in $values; do  # e.g. extra-index-url = file:///a/simple https://b/simple
            case $word in
                file://*) path=${word#file://}; words+=("file://$HOST_PIP$path") ;;
                /*) path=$word; words+=("$HOST_PIP$path") ;;
                *) words+=("$word"); continue ;;  # a remote index: reached through --network=host
            esac
            # A local "simple" index links its files relatively (../../files/...): mount its parent.
            [ "$(basename "$path")" = simple ] && path=$(dirname "$path")
            if [ -e "$path" ] && [ -z "${mounted[$path]:-}" ]; then
                mounted[$path]=1
                build_args+=(-v "$path:$HOST_PIP$path:ro")
            fi
        done
        conf+=("$key = ${words[*]}")
        if [ "$key" = index-url ]; then index_url=${words[*]}; fi
    done <<<"$pip_settings"
    pipconf_dir=$(mktemp -d)
    trap 'rm -rf "$pipconf_dir"' EXIT
    printf '%s\n' "${conf[@]}" > "$pipconf_dir/pip.conf"
    build_args+=(-v "$pipconf_dir/pip.conf:/etc/pip.conf:ro")
    log "pip settings forwarded to the build: $(tr '\n' ';' <<<"$pip_settings")"
fi
# Where download.pytorch.org does not resolve, pip would spend retries on it before falling back:
# take torch from the host's own index (plus the forwarded find-links) instead.
if ! getent hosts download.pytorch.org >/dev/null; then
    build_args+=(--build-arg "TORCH_INDEX_URL=${index_url:-https://pypi.org/simple}")
fi

# 4. The image. chroot isolation and the host network: what works for root without a container
#    runtime (crun cannot run containers on this kind of machine, buildah's chroot can).
log "building $IMAGE"
old_id=$(podman image inspect --format '{{.Id}}' "$IMAGE" 2>/dev/null || true)
podman build --isolation=chroot --network=host --layers \
    --build-arg "BASE=$BASE_IMAGE" "${build_args[@]}" \
    -f "$ROOT/docker/Dockerfile.cpu" -t "$IMAGE" "$ROOT" >&2
new_id=$(podman image inspect --format '{{.Id}}' "$IMAGE")
# The image this tag named before is now untagged: remove it (only it, not every dangling image on
# the machine), or each rebuild after an edit would keep another copy of the changed layers.
if [ -n "$old_id" ] && [ "$old_id" != "$new_id" ]; then
    podman rmi "$old_id" >/dev/null 2>&1 || true  # still tagged elsewhere or in use: keep it
fi
echo "$new_id"
