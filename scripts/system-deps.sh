#!/usr/bin/env bash
# Installs the Debian packages that the integration tests and benchmarks drive for real.
# Idempotent: does nothing when all are present. Never fails the build: where it cannot
# install (not root, no apt, no network) it prints a note and the tests that need a
# missing program skip with a printed reason.
set -u
PACKAGES=(nginx redis-server wrk buildah podman runc uidmap slirp4netns fuse-overlayfs
          debootstrap chromium chromium-driver prometheus openjdk-17-jre-headless)
missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  echo "system-deps: all present (${PACKAGES[*]})"
  exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
  echo "system-deps: NOTE missing ${missing[*]}; run 'sudo make system-deps' to install them." \
       "Tests that need them will skip and say why."
  exit 0
fi
echo "system-deps: installing ${missing[*]}"
# Keep package scripts from starting daemons (nginx, redis, prometheus) on their default ports:
# the tests start their own, on loopback, with their own config.
created_policy=0
if [ ! -e /usr/sbin/policy-rc.d ]; then
  printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
  created_policy=1
fi
export DEBIAN_FRONTEND=noninteractive
{ apt-get update -qq && apt-get install -y -qq --no-install-recommends "${missing[@]}"; } \
  > /tmp/torchship-system-deps.log 2>&1
rc=$?
[ $created_policy = 1 ] && rm -f /usr/sbin/policy-rc.d
if [ $rc != 0 ]; then
  echo "system-deps: NOTE apt-get failed (rc=$rc); see /tmp/torchship-system-deps.log." \
       "Tests that need the missing programs will skip and say why."
  tail -5 /tmp/torchship-system-deps.log
fi
exit 0
