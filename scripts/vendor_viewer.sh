#!/usr/bin/env bash
# Refresh the JavaScript libraries of the circuit viewer (`icl circuit serve`) from the npm
# registry: the exact versions below, checked against the registry's sha512 integrity, copied
# into icl_cli/circuit/viewer/static/vendor/ with their licences, and recorded in VENDOR.json
# (name, version, licence, integrity, sha256 of each copied file). The copies are committed, so
# installing and serving need neither npm nor a network; run this only to change a version.
#   bash scripts/vendor_viewer.sh
set -euo pipefail
cd "$(dirname "$0")/.."
out=icl_cli/circuit/viewer/static/vendor
# name version licence integrity file-in-package
libs=(
  "d3 7.9.2 ISC sha512-ZKb/mONPVKzaO5UlcWcwN8bS4ezvQaYu+bsou+XgNABdGC800kwH651ADTbbTxMPHW13UlvbQafdmJQDk1w7Mg== dist/d3.min.js"
  "@dagrejs/dagre 3.1.4 MIT sha512-tW3fsvXxSteGpBHgT/hqPxBxTibPw409mH97S6LzXe+ddak2/RtPtYkYPo5gfvzBtnjxrZnoh8ft62zA3LDAZQ== dist/dagre.min.js"
)
command -v npm >/dev/null || { echo "npm is needed to refresh the vendored files (apt-get install npm)" >&2; exit 1; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$out"
records=()
for lib in "${libs[@]}"; do
  read -r name version licence integrity file <<<"$lib"
  (cd "$tmp" && npm pack --silent "$name@$version" >/dev/null)
  tgz="$tmp/$(echo "${name#@}" | tr / -)-$version.tgz"
  got="sha512-$(openssl dgst -sha512 -binary "$tgz" | base64 -w0)"
  [ "$got" = "$integrity" ] || { echo "$name@$version: integrity $got, expected $integrity" >&2; exit 1; }
  mkdir -p "$tmp/$name" && tar xzf "$tgz" -C "$tmp/$name"
  base=$(basename "$file")
  short=${base%%.*}
  # the source map is not shipped: drop the comment that points at it
  grep -v '^//# sourceMappingURL=' "$tmp/$name/package/$file" > "$out/$base"
  cp "$tmp/$name/package/LICENSE" "$out/LICENSE.$short"
  sha=$(sha256sum "$out/$base" | cut -d' ' -f1)
  records+=("{\"name\": \"$name\", \"version\": \"$version\", \"license\": \"$licence\", \"integrity\": \"$integrity\", \"file\": \"$base\", \"from\": \"$file\", \"sha256\": \"$sha\", \"license_file\": \"LICENSE.$short\"}")
done
{
  echo "["
  for i in "${!records[@]}"; do
    sep=","; [ "$i" = $((${#records[@]} - 1)) ] && sep=""
    echo "  ${records[$i]}$sep"
  done
  echo "]"
} > "$out/VENDOR.json"
echo "vendored into $out:" >&2
cat "$out/VENDOR.json" >&2
