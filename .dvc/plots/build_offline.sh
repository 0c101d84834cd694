#!/bin/sh
# Builds .dvc/plots/offline.html: DVC's plot page with Vega, Vega-Lite and vega-embed inlined from
# their npm packages (the versions DVC's own page loads from a CDN), so `dvc plots show` renders
# without internet, and a table of contents at the top of the page (an inline script: one line per
# group, the curves of dvc.yaml's `plots:` by title, the figures by folder). Needs npm once; the
# built page is committed. Run from the repository root.
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
  cat <<'EOF'
<script>
// Remembers each chart's title as DVC's page embeds it, for the table of contents.
var dvcPlotTitles = {};
var dvcEmbed = vegaEmbed;
vegaEmbed = function (el, spec, opts) {
  var title = spec && spec.title;
  dvcPlotTitles[String(el).replace(/^#/, "")] = title && typeof title === "object" ? title.text : title;
  return dvcEmbed(el, spec, opts);
};
</script>
<style>
table { border-spacing: 15px; }
body { font-family: sans-serif; }
#toc { margin: 0 0 1.5em 0; padding: 0.5em 1em; border: 1px solid #ccc; background: #fafafa; font-size: 14px; }
#toc h2 { margin: 0.2em 0 0.4em 0; font-size: 18px; }
#toc p { margin: 0.3em 0; }
#toc a { display: inline-block; margin-right: 0.9em; white-space: nowrap; }
</style>
</head>
<body>
<nav id="toc"><h2>Contents</h2></nav>
{plot_divs}
<script>
// Table of contents: every plot DVC put on the page, the curves first (by title), then the figures by folder.
(function () {
  var toc = document.getElementById("toc"), groups = {}, order = [];
  Array.prototype.forEach.call(document.body.children, function (div) {
    if (div.tagName !== "DIV" || !div.id) return;
    var group = "curves", label = div.id, first = div.querySelector("p");
    if (!dvcPlotTitles.hasOwnProperty(div.id) && first) {  // an image: its first paragraph is its path
      var path = first.textContent.trim(), cut = path.lastIndexOf("/");
      group = cut < 0 ? "." : path.slice(0, cut);
      label = path.slice(cut + 1);
    } else if (dvcPlotTitles[div.id] && dvcPlotTitles[div.id] !== div.id) {
      label = div.id + ": " + dvcPlotTitles[div.id];
    }
    if (!groups[group]) { groups[group] = []; order.push(group); }
    groups[group].push([div.id, label]);
  });
  order.forEach(function (group) {
    var line = document.createElement("p"), name = document.createElement("b");
    name.textContent = group + ": ";
    line.appendChild(name);
    groups[group].forEach(function (entry) {
      var a = document.createElement("a");
      a.href = "#" + entry[0];
      a.textContent = entry[1];
      line.appendChild(a);
    });
    toc.appendChild(line);
  });
})();
</script>
</body>
</html>
EOF
} > "$out.tmp"
mv "$out.tmp" "$out"
echo "$out: $(wc -c < "$out") bytes"
