#!/usr/bin/env bash
# Run the CPU image's entrypoint where `podman run` cannot run containers (no usable OCI runtime,
# e.g. crun without cgroup/setrlimit rights): the image's filesystem is mounted with
# `podman create` + `podman mount` and its entrypoint is started in a chroot, with the image's
# environment and working directory. Like `docker run --rm`, minus isolation: same network,
# processes, user (root) and kernel as the caller.
#   docker/run-cpu-image.sh [--image NAME] [--entrypoint PROG] [-v HOST_DIR:IMAGE_DIR]...
#                           [-e KEY=VALUE]... [--] ARGS...
#   docker/run-cpu-image.sh -v "$PWD/data:/workspace/data" -v "$PWD/runs:/workspace/runs" -- \
#       train --config configs/tiny.yaml train.steps=2 optim.warmup_steps=1
# Writes outside the -v directories go to the container's own layer and are gone afterwards.
set -euo pipefail
image=megatron-lite:cpu
entrypoint_override=
volumes=()
envs=()
while [ $# -gt 0 ]; do
    case $1 in
        --image) image=$2; shift 2 ;;
        --entrypoint) entrypoint_override=$2; shift 2 ;;
        -v) volumes+=("$2"); shift 2 ;;
        -e) envs+=("$2"); shift 2 ;;
        --) shift; break ;;
        *) break ;;
    esac
done
[ "$(id -u)" -eq 0 ] || { echo "run-cpu-image: run as root (mount, chroot)" >&2; exit 1; }

# What `docker run` would take from the image: entrypoint, command, environment (PATH to the venv,
# ...) and working directory. `items` prints one list item a line (dropping inspect's blank last one).
items() { podman image inspect --format "{{range .Config.$1}}{{println .}}{{end}}" "$image" | sed '/^$/d'; }
mapfile -t entrypoint < <(items Entrypoint)
mapfile -t cmd < <(items Cmd)
mapfile -t image_env < <(items Env)
if [ -n "$entrypoint_override" ]; then
    entrypoint=("$entrypoint_override")  # as with docker run --entrypoint, the image's CMD is dropped
elif [ $# -eq 0 ]; then
    set -- "${cmd[@]}"  # no arguments: the image's CMD (--help), as docker run does
fi
workdir=$(podman image inspect --format '{{.Config.WorkingDir}}' "$image")

container=$(podman create "$image")
cleanup() {
    podman umount "$container" >/dev/null || true
    podman rm --force "$container" >/dev/null || true
}
trap cleanup EXIT
rootfs=$(podman mount "$container")

# Every mount below is made in a private mount namespace (unshare): nothing propagates to the
# host's /dev or /proc, and all of it disappears when the command ends, however it ends.
# /proc, /dev and /sys: what Python and torch read (CPU count, /dev/null, /dev/urandom, ...).
# shellcheck disable=SC2016  # the $variables in quotes are the inner bash's
unshare --mount --propagation private bash -euo pipefail -c '
    rootfs=$1; workdir=$2; nvol=$3; shift 3
    mount -t proc proc "$rootfs/proc"
    mount --rbind /dev "$rootfs/dev"
    mount --rbind /sys "$rootfs/sys"
    for _ in $(seq "$nvol"); do
        src=${1%%:*}; dst=${1#*:}; shift
        mkdir -p "$src" "$rootfs$dst"  # a missing host directory is created, as docker run -v does
        mount --bind "$src" "$rootfs$dst"
    done
    # env -i: only the image environment (and -e), as in a container; -C: its working directory.
    exec chroot "$rootfs" /usr/bin/env -i -C "${workdir:-/}" "$@"
' run-cpu-image "$rootfs" "$workdir" "${#volumes[@]}" "${volumes[@]}" \
    "${image_env[@]}" "${envs[@]}" "${entrypoint[@]}" "$@"
