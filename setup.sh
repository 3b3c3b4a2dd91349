#!/usr/bin/env bash
# Installs what qhnet needs on a fresh Debian/Ubuntu machine: the offline Fashion-MNIST
# dataset (Debian's dataset-fashion-mnist) and the package with the versions it was tested
# with (constraints.txt; pyproject.toml declares the compatible ranges). Safe to run again.
set -euo pipefail
cd "$(dirname "$0")"

as_root=()
if [ "$(id -u)" != 0 ]; then as_root=(sudo); fi

if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  "${as_root[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${as_root[@]}" apt-get install -y -qq dataset-fashion-mnist
fi
python -m pip install -q --disable-pip-version-check --constraint constraints.txt -e ".[dev]"
