#!/usr/bin/env bash
# Build the CPU flavour's base image from Debian packages, for machines that cannot pull images from a registry:
#
#     docker/base-image.sh [TAG]        (default rag-platform/debian:bookworm; `make base-image` runs it)
#
# debootstrap --variant=minbase bookworm from the apt mirror this machine is configured with, plus the machine's
# own CA certificates (/usr/local/share/ca-certificates: pip and apt inside builds must trust what the host
# trusts), then `docker import`. Does nothing when the image already exists (REBUILD=1 forces it). Needs root,
# debootstrap and a running Docker engine. GPU hosts don't need it: the GPU flavour starts from nvidia/cuda.
set -euo pipefail

TAG="${1:-rag-platform/debian:bookworm}"
SUITE=bookworm

if [ "${REBUILD:-0}" != 1 ] && docker image inspect "$TAG" >/dev/null 2>&1; then
  echo "base image $TAG exists (REBUILD=1 to build it again)"
  exit 0
fi

# The first Debian (not security) mirror in this machine's apt sources, deb822 or one-line format.
mirror() {
  local uri
  uri=$(grep -hs -E '^\s*URIs:' /etc/apt/sources.list.d/*.sources | awk '{print $2}' | grep -v -- '-security' \
        | grep -m1 debian || true)
  [ -n "$uri" ] || uri=$(grep -hs -E '^\s*deb\s' /etc/apt/sources.list /etc/apt/sources.list.d/*.list \
                         | awk '{print $2}' | grep -v -- '-security' | grep -m1 debian || true)
  echo "${uri:-http://deb.debian.org/debian}"
}

MIRROR=$(mirror)
ROOTFS=$(mktemp -d /var/tmp/rag-base.XXXXXX)
trap 'rm -rf "$ROOTFS"' EXIT

started=$(date +%s)
echo "debootstrap $SUITE from $MIRROR into $ROOTFS (a few minutes)"
debootstrap --variant=minbase --include=ca-certificates "$SUITE" "$ROOTFS" "$MIRROR" >"$ROOTFS.log" 2>&1 \
  || { tail -n 30 "$ROOTFS.log"; rm -f "$ROOTFS.log"; exit 1; }
rm -f "$ROOTFS.log"

cat >"$ROOTFS/etc/apt/sources.list" <<EOF
deb $MIRROR $SUITE main
deb $MIRROR $SUITE-updates main
deb ${MIRROR%/debian}/debian-security $SUITE-security main
EOF
if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
  cp /usr/local/share/ca-certificates/*.crt "$ROOTFS/usr/local/share/ca-certificates/"
  chroot "$ROOTFS" update-ca-certificates >/dev/null
fi
rm -rf "$ROOTFS"/var/cache/apt/archives/*.deb "$ROOTFS"/var/lib/apt/lists/* "$ROOTFS"/tmp/*

tar -C "$ROOTFS" --numeric-owner -c . \
  | docker import --change 'ENV LANG=C.UTF-8' --change 'CMD ["bash"]' \
      --message "debootstrap --variant=minbase $SUITE" - "$TAG" >/dev/null
echo "base image $TAG built in $(( $(date +%s) - started ))s"
