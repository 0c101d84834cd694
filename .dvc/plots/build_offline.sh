#!/bin/sh
# Builds .dvc/plots/offline.html: DVC's plot page with Vega, Vega-Lite and vega-embed inlined from
# their npm packages (the versions DVC's own page loads from a CDN), so `dvc plots show` renders
# without internet. Needs npm once; the built page is committed. Run from the repository root.
set -eu
build=$(mktemp -d)
trap 'rm -rf "$build"' EXIT
(cd "$build" && npm pack --silent vega@5.20.2 vega-lite@5.2.0 vega-embed@6.18.2 >/dev/null)
for pkg in "$build"/*.tgz; do mkdir -p "${pkg%.tgz}" && tar xzf "$pkg" -C "${pkg%.tgz}"; done
out=.dvc/plots/offline.html
{
  printf '<!DOCTYPE html>\n<html>\n<head>\n{refresh_tag}\n<meta charset="utf-8">\n<title>DVC plots (offline)</title>\n'
  for lib in vega-5.20.2/package/build/vega.min.js vega-lite-5.2.0/package/build/vega-lite.min.js \
             vega-embed-6.18.2/package/build/vega-embed.min.js; do
    printf '<script>\n'; cat "$build/$lib"; printf '\n</script>\n'
  done
  printf '<style>table { border-spacing: 15px; }</style>\n</head>\n<body>\n{plot_divs}\n</body>\n</html>\n'
} > "$out.tmp"
mv "$out.tmp" "$out"
echo "$out: $(wc -c < "$out") bytes"
