#!/usr/bin/env bash
# Build the catena-mito image with podman on a machine that can reach no container
# registry: the base image is made here with debootstrap from the Debian mirror that apt
# already uses, and every Python package comes from a local wheelhouse, so the build
# itself runs with --network=none.
#
# Usage: containers/build-local.sh [--skip-smoke]
#   env TORCH_WHEEL   a CPU torch wheel for cp311 (Debian bookworm's python is 3.11)
#   env DEBIAN_MIRROR the mirror for debootstrap (default: the first deb.debian.org-style
#                     URI found in the apt sources)
#   env IMAGE         the tag to build (default localhost/catena-mito:cpu)
#
# Everything it makes lives under .build/ (git-ignored): rootfs/, wheels/, smoke/.
set -euo pipefail
SECONDS=0

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BUILD="$REPO/.build"
BASE_IMAGE=${BASE_IMAGE_LOCAL:-localhost/debian-base:bookworm}
IMAGE=${IMAGE:-localhost/catena-mito:cpu}
TORCH_WHEEL=${TORCH_WHEEL:-/opt/wheels/torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl}
SKIP_SMOKE=0
[[ "${1:-}" == "--skip-smoke" ]] && SKIP_SMOKE=1

# runc rather than crun, and explicit ulimits. Zarr and torch data loaders open many files
# at once, so ask for as many as the caller may have. podman's defaults (1048576 files and
# processes) fail with "error setting rlimit ... operation not permitted" where the
# caller lacks CAP_SYS_RESOURCE (as in unprivileged sandboxes), because runc may only
# lower a limit there; 16384 processes is below what such a sandbox's conmon inherits.
NOFILE=$(ulimit -Hn)
[[ "$NOFILE" == unlimited ]] && NOFILE=65536
NPROC=$(ulimit -Hu)
[[ "$NPROC" == unlimited || "$NPROC" -gt 16384 ]] && NPROC=16384
RUN_OPTS=(--runtime runc --ulimit "nofile=$NOFILE:$NOFILE" --ulimit "nproc=$NPROC:$NPROC")

log() { printf '\n==> %s\n' "$*" >&2; }

# runc too: podman on Debian defaults to it (and RUN_OPTS asks for it), but does not pull
# it in, and without it every build step fails with 'default OCI runtime "runc" not found'.
INSTALL_HINT="apt-get install -y podman buildah debootstrap runc"
need() {
    # Debian puts runc and debootstrap in /usr/sbin, not on a normal user's PATH.
    command -v "$1" >/dev/null 2>&1 || [[ -x "/usr/sbin/$1" || -x "/sbin/$1" ]] || {
        echo "build-local.sh: '$1' not found; install it with: $INSTALL_HINT" >&2
        exit 1
    }
}
need podman
need debootstrap
need runc

mirror_from_apt() {
    # deb822 sources (bookworm default) first, then the one-line format.
    local uri
    uri=$(grep -hsE '^URIs:' /etc/apt/sources.list.d/*.sources 2>/dev/null \
        | awk '{print $2}' | grep -v security | head -n1 || true)
    if [[ -z "$uri" ]]; then
        uri=$(grep -hsE '^deb ' /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null \
            | awk '{print $2}' | grep -v security | head -n1 || true)
    fi
    echo "${uri:-http://deb.debian.org/debian}"
}

# 1. Base image: a minimal Debian bookworm with python3, venv, pip and tini (the image's
#    init; the Dockerfile installs it with apt only where the base lacks it, and this
#    build has no network). Skipped when the image already exists, because debootstrap is
#    the slowest step and its result does not depend on this repository.
if podman image exists "$BASE_IMAGE" \
    && ! podman run --rm --network=none "${RUN_OPTS[@]}" "$BASE_IMAGE" test -x /usr/bin/tini; then
    echo "build-local.sh: $BASE_IMAGE has no /usr/bin/tini (made by an older version of" \
        "this script); remove it (podman rmi -f $BASE_IMAGE) and run again" >&2
    exit 1
fi
if ! podman image exists "$BASE_IMAGE"; then
    MIRROR=${DEBIAN_MIRROR:-$(mirror_from_apt)}
    log "debootstrap bookworm from $MIRROR"
    rm -rf "$BUILD/rootfs"
    mkdir -p "$BUILD"
    # minbase keeps the image small; libgomp1 is not needed (the torch wheel bundles its
    # OpenMP), ca-certificates is so that an online pip inside the image can use https.
    debootstrap --variant=minbase \
        --include=python3,python3-venv,python3-pip,ca-certificates,tini \
        bookworm "$BUILD/rootfs" "$MIRROR"
    # Drop what an image never needs: downloaded .debs, apt lists, docs and man pages.
    rm -rf "$BUILD/rootfs/var/cache/apt/archives/"*.deb \
        "$BUILD/rootfs/var/lib/apt/lists/"* \
        "$BUILD/rootfs/usr/share/doc/"* "$BUILD/rootfs/usr/share/man/"*
    log "importing rootfs as $BASE_IMAGE"
    tar -C "$BUILD/rootfs" -c . | podman import \
        --change 'CMD ["/bin/bash"]' --change 'ENV LANG=C.UTF-8' - "$BASE_IMAGE"
    rm -rf "$BUILD/rootfs"
fi

# 2. Wheelhouse: every dependency of the package, plus the build backend, as wheels for
#    CPython 3.11 on manylinux x86_64 (what the Debian base runs), so pip inside the build
#    needs no index. The CPU torch wheel is given as a file, so pip never looks for the
#    CUDA build and its nvidia-* dependencies.
log "filling wheelhouse $BUILD/wheels"
mkdir -p "$BUILD/wheels"
[[ -f "$TORCH_WHEEL" ]] || { echo "build-local.sh: TORCH_WHEEL=$TORCH_WHEEL does not exist" >&2; exit 1; }
python3 - "$REPO/pyproject.toml" > "$BUILD/requirements.txt" <<'PY'
import sys, tomllib
with open(sys.argv[1], "rb") as f:
    project = tomllib.load(f)
for req in project["build-system"]["requires"] + project["project"]["dependencies"]:
    print(req)
PY
PLATFORM_ARGS=(--only-binary=:all: --implementation cp --python-version 3.11 --abi cp311
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64
    --platform manylinux2014_x86_64 --platform manylinux_2_5_x86_64 --platform linux_x86_64
    --platform any)
python3 -m pip download --quiet --dest "$BUILD/wheels" "${PLATFORM_ARGS[@]}" \
    "$TORCH_WHEEL" -r "$BUILD/requirements.txt"
TORCH_VERSION=$(basename "$TORCH_WHEEL" | cut -d- -f2)

# 3. The image. --network=none proves the build is offline; the wheelhouse reaches the
#    build through WHEELHOUSE (a bind mount, so the wheels are not copied into a layer).
log "podman build $IMAGE (torch $TORCH_VERSION)"
start=$(date +%s)
podman build --network=none "${RUN_OPTS[@]}" \
    --file "$REPO/containers/Dockerfile" \
    --build-arg BASE_IMAGE="$BASE_IMAGE" \
    --build-arg TORCH_SPEC="torch==$TORCH_VERSION" \
    --build-arg WHEELHOUSE=.build/wheels \
    --build-arg PIP_NO_INDEX=1 \
    --tag "$IMAGE" "$REPO"
end=$(date +%s)
log "built $IMAGE in $((end - start)) s; size: $(podman image inspect --format '{{.Size}}' "$IMAGE") bytes"
podman image ls "$IMAGE"

[[ $SKIP_SMOKE == 1 ]] && exit 0

# 4. Smoke test inside the image, as the image's own non-root user and without network:
#    --help, then whatever of synth/predict/label the CLI offers, on a tiny volume.
log "smoke test"
podman run --rm --network=none "${RUN_OPTS[@]}" "$IMAGE" --help | tee "$BUILD/help.txt"
SMOKE="$BUILD/smoke"
rm -rf "$SMOKE" && mkdir -p "$SMOKE"
# The container user is 10001; make the bind mount writable for it.
chmod 0777 "$SMOKE"
has_cmd() { grep -qE "^[[:space:]]+$1([[:space:]]|$)" "$BUILD/help.txt"; }
# As the Kubernetes manifests run it: read-only root, no capabilities, no privilege
# escalation, writable scratch only in /tmp and $HOME.
in_image() {
    podman run --rm --network=none "${RUN_OPTS[@]}" --read-only --tmpfs /tmp \
        --tmpfs /home/catena --cap-drop ALL --security-opt no-new-privileges \
        -v "$SMOKE:/data:Z" -v "$REPO/jobs:/jobs:ro,Z" -w /data "$IMAGE" "$@"
}
for cmd in synth train predict label; do
    has_cmd "$cmd" || { echo "catena-mito has no '$cmd' command yet; smoke test stops here" >&2; exit 0; }
done
# A tiny synthetic volume, a one-epoch CPU model, then a 2-shard predict and a 2-shard
# label run phase by phase: the same job configs a user runs locally (jobs/local/), with
# sizes turned down by --set.
in_image synth data/synthetic.zarr --shape 64 128 128 --seed 0
in_image synth data/synthetic-test.zarr --shape 64 128 128 --seed 1
in_image train --config /jobs/local/train.yaml \
    --set epochs=1 --set eval_interval=1 --set ckpt_interval=1 --set num_workers=0 \
    --set device=cpu --set subsample_number=8
for i in 0 1; do
    in_image predict --config /jobs/local/predict.yaml --shard-index "$i" --num-shards 2 \
        --set num_workers=0 --set device=cpu
done
for i in 0 1; do
    in_image label --config /jobs/local/label.yaml --phase blocks --shard-index "$i" --num-shards 2
done
in_image label --config /jobs/local/label.yaml --phase merge
for i in 0 1; do
    in_image label --config /jobs/local/label.yaml --phase relabel --shard-index "$i" --num-shards 2
done
in_image label --config /jobs/local/label.yaml --phase clean
log "smoke test passed; outputs in $SMOKE; total $SECONDS s"
