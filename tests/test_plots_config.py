"""`dvc plots show` draws readable curves: one colour per series, a log scale for the hypergradient
norms, integer ticks on epochs, meta-iterations and trials, and a table of contents on the page.

The curves' templates live in .dvc/plots/ (series.json, series_log.json); the page is
.dvc/plots/offline.html (built by build_offline.sh). The first tests read them as committed; the
slow ones run `dvc plots show` on dvc.yaml's `plots:` section over small CSVs and check what it wrote,
the last one in a headless browser where chromium is installed."""
import json
import os
import re
import shutil
import struct
import subprocess
import zlib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PLOTS = [next(iter(entry.items())) if isinstance(entry, dict) else (entry, None)
         for entry in yaml.safe_load((ROOT / "dvc.yaml").read_text())["plots"]]
CURVES = {name: props for name, props in PLOTS if props and "y" in props}
FIGURE_DIRS = [name for name, props in PLOTS if props is None]
LOG_Y = {"drmad_hypergradient_norm"}  # decades apart between inits
INTEGER_X = {"epoch", "meta_iteration", "trial"}
SERIES_KEYS = ("filename::field", "filename", "field")  # what dvc-render names a series by, by what varies


def layers(spec: dict):
    """The spec and every layer under it."""
    yield spec
    for layer in spec.get("layer", []):
        yield from layers(layer)


def encodings(spec: dict, channel: str) -> list[dict]:
    return [layer["encoding"][channel] for layer in layers(spec) if channel in layer.get("encoding", {})]


def check_curve(name: str, spec: dict):
    """What makes `name`'s Vega-Lite spec (a template, or as DVC filled it) readable."""
    colors = encodings(spec, "color")
    assert colors and all(c.get("field") == "series" for c in colors), (name, colors)
    calculated = {t["as"]: t["calculate"] for t in spec.get("transform", []) if "calculate" in t}
    assert "series" in calculated and all(key in calculated["series_name"] for key in SERIES_KEYS), (name, calculated)
    for dash in encodings(spec, "strokeDash"):  # dashes tell revisions apart, never the series
        assert dash.get("field") == "rev", (name, dash)
    x, y = encodings(spec, "x"), encodings(spec, "y")
    assert x and all(e.get("axis", {}).get("tickMinStep") == 1 and e["axis"].get("format") == "d" for e in x), (name, x)
    assert y and all((e.get("scale", {}).get("type") == "log") == (name in LOG_Y) for e in y), (name, y)


def template(props: dict) -> dict:
    path = ROOT / ".dvc/plots" / f"{props['template']}.json"
    assert path.is_file(), f"{props['template']}: not one of the project's templates (DVC's own draw one colour)"
    return json.loads(path.read_text())


@pytest.mark.parametrize("name", sorted(CURVES))
def test_each_curve_uses_a_readable_template(name):
    props = CURVES[name]
    assert props["x"] in INTEGER_X, props["x"]
    assert props.get("title"), "a title saying what the series are"
    check_curve(name, template(props))


def test_the_page_carries_a_table_of_contents_and_no_cdn():
    page = (ROOT / ".dvc/plots/offline.html").read_text()
    assert "cdn.jsdelivr" not in page and "vegaEmbed" in page
    body = page[page.rindex("<body>"):]
    nav, plots = body.find('<nav id="toc">'), body.find("{plot_divs}")
    assert 0 <= nav < plots, "the table of contents stands above the plots"
    assert 'a.href = "#" + entry[0]' in body[plots:], "its links are filled in once the plots are on the page"


def png(path: Path):
    """A 1x1 grey PNG."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 1, 1, 8, 0, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"\x00\x80")) + chunk(b"IEND", b""))


@pytest.fixture(scope="module")
def page(tmp_path_factory) -> Path:
    """`dvc plots show` on a repository holding the project's `plots:` section, .dvc config and
    templates, small CSVs for every curve (positive values, x 0..3) and one image per figure folder."""
    repo = tmp_path_factory.mktemp("plots")
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    subprocess.run(["dvc", "init", "-q"], cwd=repo, check=True)
    shutil.copy(ROOT / ".dvc/config", repo / ".dvc/config")
    shutil.copytree(ROOT / ".dvc/plots", repo / ".dvc/plots", dirs_exist_ok=True)
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"plots": [{n: p} if p else n for n, p in PLOTS]}, sort_keys=False))
    columns: dict[str, set] = {}
    for props in CURVES.values():
        for file, fields in props["y"].items():
            columns.setdefault(file, {props["x"]}).update([fields] if isinstance(fields, str) else fields)
    for i, (file, names) in enumerate(sorted(columns.items())):
        names = sorted(names)
        rows = [",".join(names)] + [",".join(f"{10.0 ** -(i + j) * (4 - step):g}" if n not in INTEGER_X else str(step)
                                             for j, n in enumerate(names)) for step in range(4)]
        (repo / file).parent.mkdir(parents=True, exist_ok=True)
        (repo / file).write_text("\n".join(rows) + "\n")
    for folder in FIGURE_DIRS:
        png(repo / folder / "sub" / "fig.png")
    subprocess.run(["dvc", "plots", "show", "-o", "out"], cwd=repo, check=True, capture_output=True)
    return repo / "out" / "index.html"


def specs(html: str) -> dict[str, dict]:
    return {m.group(1): json.loads(m.group(2)) for m in
            re.finditer(r'<div id = "(\w+)">\s*<script type = "text/javascript">\s*var spec = (.*?);\n', html)}


@pytest.mark.slow
def test_dvc_plots_show_draws_each_series_in_its_colour(page):
    html = page.read_text()
    assert "cdn.jsdelivr" not in html and "vegaEmbed" in html
    drawn = specs(html)
    assert set(drawn) == set(CURVES)
    for name, spec in drawn.items():
        check_curve(name, spec)
        rows = spec["data"]["values"]
        key = next(k for k in SERIES_KEYS if k in rows[0])  # the series' name, as the template reads it
        definitions = sum(1 if isinstance(f, str) else len(f) for f in CURVES[name]["y"].values())
        assert len({row[key] for row in rows}) == definitions, (name, key)


def series_labels(props: dict) -> list[str]:
    """The legend a curve should show: what differs between its y definitions, a file by its
    folder below the files' common one (plots/drmad/-4.0/meta.csv: -4.0)."""
    pairs = [(file, field) for file, fields in props["y"].items() for field in ([fields] if isinstance(fields, str) else fields)]
    files, fields = {f for f, _ in pairs}, {f for _, f in pairs}
    common = os.path.commonpath(list(files))
    short = {f: os.path.dirname(os.path.relpath(f, common)) or os.path.relpath(f, common) for f in files}
    return sorted(" · ".join([short[f]] * (len(files) > 1) + [field] * (len(fields) > 1)) for f, field in pairs)


def texts(svg: str, role: str) -> list[str]:
    return [t for group in re.findall(rf'<g class="mark-text role-{role}"[^>]*>(.*?)</g>', svg, re.S)
            for t in re.findall(r"<text[^>]*>(.*?)</text>", group)]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("chromium") is None, reason="chromium not installed")
def test_the_page_as_a_browser_draws_it(page):
    """Legends, axes and the table of contents as Vega and the page's script drew them (the
    templates ask vega-embed for SVG, so the drawing is text in the DOM)."""
    dom = subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=10000",
                          "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120, check=True).stdout
    toc = dom[dom.index('<nav id="toc">'):dom.index("</nav>")]
    plots = list(re.finditer(r'<div\s+id\s*=\s*"([^"]+)"', dom[dom.index("</nav>"):]))
    assert len(plots) == len(CURVES) + len(FIGURE_DIRS), [m.group(1) for m in plots]
    for m in plots:
        assert f'href="#{m.group(1)}"' in toc, m.group(1)
    for name, props in CURVES.items():  # curves by their titles, figures by their folders
        assert props["title"] in toc, name
    for folder in FIGURE_DIRS:
        assert f"<b>{folder}/sub: </b>" in toc, folder

    bounds = [m.start() for m in re.finditer(r'<div\s+id\s*=\s*"', dom)] + [len(dom)]
    for name, props in CURVES.items():
        start = dom.index(f'id="{name}"')
        svg = dom[start:min(b for b in bounds if b > start)]
        assert "<svg" in svg, f"{name}: not drawn"
        colours, revisions = svg.split("aria-label=\"Symbol legend titled 'revision'")
        assert texts(colours, "legend-label") == series_labels(props), name  # one colour per series
        assert texts(revisions, "legend-label") == ["workspace"], name       # one dash per revision
        axes = dict(re.findall(r'aria-label="([XY])-axis titled [^"]* for a (\w+) scale', svg))
        assert axes == {"X": "linear", "Y": "log" if name in LOG_Y else "linear"}, (name, axes)
        ticks = texts(svg[svg.index('aria-label="X-axis'):svg.index('aria-label="Y-axis')], "axis-label")
        assert ticks and all(re.fullmatch(r"\d+", t) for t in ticks), (name, ticks)  # whole epochs, iterations, trials
