#!/usr/bin/env bash
# Builds the Debian package (target/debian/pbxgate_<version>_<arch>.deb) with cargo-deb:
# the binary as /usr/bin/pbxgate, config.toml as /etc/pbxgate/config.toml (a conffile),
# scripts/pbxgate.service as the systemd unit (enabled, restarted on upgrade), and a
# `pbxgate` system user made at install. Installs cargo-deb first if it is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v cargo-deb >/dev/null 2>&1 || cargo install cargo-deb --locked
cargo deb --locked "$@"
ls -l target/debian/*.deb
