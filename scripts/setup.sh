#!/usr/bin/env bash
# Sets up everything dicomnode needs on Debian 12 / Python 3.11: system peers and tools (dcmtk,
# Orthanc, dicom3tools, dcm2niix, chromium), the node's .venv and the local Triton server's venv.
# Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=${PYTHON:-python3}

APT_PKGS="dcmtk orthanc orthanc-dicomweb dicom3tools dcm2niix chromium openssl"
missing=""
for p in $APT_PKGS; do dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"; done
if [ -n "$missing" ]; then
  if [ "$(id -u)" = 0 ]; then
    echo "setup: installing Debian packages:$missing"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >/dev/null
  else
    echo "setup: missing Debian packages (run as root or install them):$missing" >&2
  fi
fi

stamp=.venv/.dicomnode-installed
want=$(cat pyproject.toml | sha256sum | cut -c1-16)
if [ ! -x .venv/bin/python ]; then "$PY" -m venv .venv; fi
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "setup: installing Python packages into .venv"
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -e '.[train,test]'
  echo "$want" > "$stamp"
fi

tstamp=.venv-triton/.dicomnode-installed
twant=$(cat deploy/triton-requirements.txt | sha256sum | cut -c1-16)
if [ ! -x .venv-triton/bin/python ]; then "$PY" -m venv .venv-triton; fi
if [ "$(cat "$tstamp" 2>/dev/null)" != "$twant" ]; then
  echo "setup: installing the local Triton server into .venv-triton"
  .venv-triton/bin/pip install -q --upgrade pip
  .venv-triton/bin/pip install -q -r deploy/triton-requirements.txt
  echo "$twant" > "$tstamp"
fi
echo "setup: ready ($ROOT/.venv/bin/dicomnode)"
