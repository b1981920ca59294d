#!/usr/bin/env bash
# Refreshes the Swagger UI files that `/docs` serves from
# crates/control-plane/assets/docs/swagger-ui/. They are committed and built
# into the binary (include_bytes!), so neither a build nor a running server
# fetches anything; run this only to move to another pinned version, then
# review the diff and commit it. npm checks the package against the
# registry's integrity hash; the hash below pins the exact tarball.
set -euo pipefail
version="5.35.0"
integrity="sha512-U06rpMtW9V3XPGOBeamTUSr0Z09jMX4IJuANpE/EZbAhw0G8CgwrzU4YmXkn/h0wCDNsXdGarTNNHC3sU8yVUQ=="
root_dir="$(cd "$(dirname "$0")/.." && pwd)"
dest="$root_dir/crates/control-plane/assets/docs/swagger-ui"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
cd "$work"
npm pack --silent "swagger-ui-dist@$version" >/dev/null
tgz="swagger-ui-dist-$version.tgz"
got="sha512-$(openssl dgst -sha512 -binary "$tgz" | base64 -w0)"
if [ "$got" != "$integrity" ]; then
  echo "vendor-swagger-ui: $tgz has integrity $got, expected $integrity" >&2
  exit 1
fi
tar xzf "$tgz"
mkdir -p "$dest"
for f in swagger-ui-bundle.js swagger-ui.css LICENSE NOTICE swagger-ui-bundle.js.LICENSE.txt; do
  cp "package/$f" "$dest/$f"
done
echo "vendor-swagger-ui: swagger-ui-dist $version in $dest" >&2
