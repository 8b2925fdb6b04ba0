#!/usr/bin/env bash
# Makes the Dockerfile's base image (docker.io/library/python:3.11-slim) from Debian packages
# with debootstrap, for machines that reach no image registry, and keeps it in the local
# container storage that buildah and podman share. Does nothing when it exists; --force
# rebuilds. Needs root. Same as: torchship image base
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
[ -x "$PY" ] || PY=python3
exec "$PY" -m torchship image base "$@"
