#!/usr/bin/env bash
# Install the WordNet 3.0 database used by synonym augmentation (Debian/Ubuntu package `wordnet-base`,
# files land in /usr/share/wordnet). Safe to run repeatedly: does nothing when the package is present.
set -euo pipefail

if dpkg-query -W -f='${Status}' wordnet-base 2>/dev/null | grep -q "install ok installed"; then
    echo "wordnet-base already installed"
    exit 0
fi

if [ "$(id -u)" -eq 0 ]; then
    SUDO=""
elif command -v sudo >/dev/null 2>&1; then
    SUDO="sudo"
else
    echo "install_wordnet.sh: need root or sudo to run apt-get" >&2
    exit 1
fi

export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -q
# Only the database files; recommends would pull in the Tk browser.
$SUDO apt-get install -y -q --no-install-recommends wordnet-base
