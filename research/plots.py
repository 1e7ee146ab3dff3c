"""research/plots.py — the SVG pictures: density per layer, the quality/compute frontier, speed against density,
the heatmap of what skips.

    python evaluate.py --ckpt=out --text=val.txt --json > r.json
    python -m research.plots --density=r.json --plot=density.svg           # density per layer of one result
    python -m research.plots --frontier='results/*.json' --plot=frontier.svg   # many results, one picture
    python bench.py --densities=1,0.5,0.25 --kv=all --prefill=1x1024 --json > b.json   # one setup per file
    python -m research.plots --speed='CPU=b.json,GPU=g.json' --plot=speed.svg   # bench.py's speedups

Each picture is a small hand-written SVG, no plotting library:
- --density: attention and MLP density per layer, as two bar series, of one result of
  `evaluate.py --ckpt=OUT_DIR --json` (a sparse model against its base: per_layer in its JSON);
- --frontier: perplexity / dense perplexity against the compute ratio, one line per method
  (scoring.method: the gates, or how a checkpoint was trained), of many such results
  (comma-separated, globs allowed);
- --speed: the speedup over the dense path against the density, of bench.py --json results
  (comma-separated LABEL=FILE or FILE, the label defaults to the file's name; FILE@prefill or
  FILE@decode for one mode): for each file a solid line for its prefills, a dotted one for its
  decoding, and a thin dashed one for the FLOP model's ideal speedup (of its prefills), from
  its forced (random) gates' rows;
- heatmap_svg: density per token group and layer, which `python -m research.studies --plot=x.svg` draws.
A result file is what evaluate.py or bench.py printed: the JSON is its last line (the lines above
it, the human-readable report, are skipped).

Every option below is --key=value or --key value (python -m research.plots --help lists them).
"""
import glob
import json
from collections import defaultdict
from xml.sax.saxutils import escape

from configurator import overrides, run_main
from scoring import GATES_METHOD

DEFAULTS = dict(
    density="",                     # an evaluate.py --ckpt --json result file: draw its density per layer
    frontier="",                    # evaluate.py --json result files (comma-separated, globs allowed):
                                    # draw perplexity vs compute ratio per method
    speed="",                       # bench.py --json result files, LABEL=FILE (comma-separated):
                                    # draw the speedup vs density, prefill and decoding
    plot="",                        # the .svg file to write
)


def read_result(path):
    """The JSON on the last line of an evaluate.py --json (an object) or bench.py --json (a list of
    rows) output file."""
    try:
        with open(path) as f:
            return json.loads(f.read().strip().splitlines()[-1])
    except (OSError, ValueError, IndexError) as e:
        raise ValueError(f"cannot read a result from {path} ({e}): pass the output of evaluate.py --json "
                         "or bench.py --json, whose last line is the JSON") from None


def density_svg(per_layer, title: str) -> str:
    """Density per layer as two bar series (attention, MLP), in a small hand-written SVG."""
    W, H, left, right, top, bottom = 720, 320, 56, 16, 44, 44
    plot_w, plot_h = W - left - right, H - top - bottom
    slot = plot_w / len(per_layer)
    bar = 0.4 * slot
    colors = {"attn": "#4c78a8", "mlp": "#f58518"}

    def y(d):
        return top + plot_h * (1 - d)

    svg = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" '
           f'font-size="11">',
           f'<text x="{W / 2}" y="18" text-anchor="middle" font-size="13">{escape(title)}</text>']
    for tick in (0, 0.25, 0.5, 0.75, 1):                                      # y axis and grid
        svg.append(f'<line x1="{left}" x2="{W - right}" y1="{y(tick):.1f}" y2="{y(tick):.1f}" stroke="#ddd"/>')
        svg.append(f'<text x="{left - 6}" y="{y(tick) + 4:.1f}" text-anchor="end">{tick:g}</text>')
    for i, row in enumerate(per_layer):                                        # the bars
        for j, kind in enumerate(("attn", "mlp")):
            x = left + i * slot + 0.1 * slot + j * bar
            svg.append(f'<rect x="{x:.1f}" y="{y(row[kind]):.1f}" width="{bar:.1f}" '
                       f'height="{plot_h * row[kind]:.1f}" fill="{colors[kind]}"/>')
        svg.append(f'<text x="{left + (i + 0.5) * slot:.1f}" y="{H - bottom + 14}" '
                   f'text-anchor="middle">{row["layer"]}</text>')
    svg.append(f'<text x="{left + plot_w / 2}" y="{H - 8}" text-anchor="middle">layer</text>')
    svg.append(f'<text transform="translate(14 {top + plot_h / 2}) rotate(-90)" '
               f'text-anchor="middle">density (share of tokens computed)</text>')
    for j, kind in enumerate(("attn", "mlp")):                                 # legend
        svg.append(f'<rect x="{W - right - 110 + 55 * j}" y="28" width="10" height="10" fill="{colors[kind]}"/>')
        svg.append(f'<text x="{W - right - 96 + 55 * j}" y="37">{kind}</text>')
    svg.append("</svg>")
    return "\n".join(svg)


def axes(box, ranges, title: str, tick: str):
    """The opening of a line plot's SVG: its title, grid and tick labels (tick: their format).
    box (W, H, left, right, top, bottom) in pixels, ranges (x0, x1, y0, y1) in data units.
    -> (svg lines, px, py): px, py map data to pixels."""
    W, H, left, right, top, bottom = box
    x0, x1, y0, y1 = ranges
    px = lambda x: left + (W - left - right) * (x - x0) / (x1 - x0)          # noqa: E731
    py = lambda y: top + (H - top - bottom) * (1 - (y - y0) / (y1 - y0))    # noqa: E731
    svg = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" '
           f'font-size="11">', f'<text x="{(W - right) / 2}" y="18" text-anchor="middle" font-size="13">'
           f'{escape(title)}</text>']
    for i in range(6):                                                        # grid and tick labels
        x, y = x0 + (x1 - x0) * i / 5, y0 + (y1 - y0) * i / 5
        svg.append(f'<line x1="{px(x):.1f}" x2="{px(x):.1f}" y1="{top}" y2="{H - bottom}" stroke="#eee"/>')
        svg.append(f'<text x="{px(x):.1f}" y="{H - bottom + 14}" text-anchor="middle">{tick.format(x)}</text>')
        svg.append(f'<line x1="{left}" x2="{W - right}" y1="{py(y):.1f}" y2="{py(y):.1f}" stroke="#eee"/>')
        svg.append(f'<text x="{left - 6}" y="{py(y) + 4:.1f}" text-anchor="end">{tick.format(y)}</text>')
    return svg, px, py


def frontier_svg(rows, title: str) -> str:
    """Perplexity ratio (sparse / dense) against compute ratio, one line per method.

    rows: evaluate.py --json results (each with compute_ratio, perplexity, dense_perplexity, and
    method, or for older results gates).
    """
    W, H, left, right, top, bottom = 700, 360, 60, 250, 40, 48
    curves = defaultdict(list)
    for r in rows:
        name = r.get("method", GATES_METHOD.get(r.get("gates"), "?"))
        curves[name].append((r["compute_ratio"], r["perplexity"] / r["dense_perplexity"]))
    xs = [x for pts in curves.values() for x, _ in pts]
    ys = [y for pts in curves.values() for _, y in pts] + [1.0]
    svg, px, py = axes((W, H, left, right, top, bottom), (min(xs) - 0.01, 1.0, 1.0, max(ys) * 1.05), title, "{:.2f}")
    palette = ["#4c78a8", "#e45756", "#54a24b", "#f58518", "#b279a2", "#9d755d", "#72b7b2", "#eeca3b",
               "#999", "#17becf", "#000", "#ff9da6"]
    fixed = {GATES_METHOD["learned"]: palette[0], GATES_METHOD["random"]: palette[1], GATES_METHOD["peek"]: palette[2]}
    others = iter(palette[3:] * 3)
    colors = {name: fixed.get(name) or next(others) for name in sorted(curves)}
    for j, (name, pts) in enumerate(sorted(curves.items())):                  # one polyline per method
        pts = sorted(pts)
        color = colors[name]
        line = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in pts)
        dash = ' stroke-dasharray="5 3"' if name.startswith("static") and "routed" not in name else ""   # no router
        svg.append(f'<polyline points="{line}" fill="none" stroke="{color}" stroke-width="2"{dash}/>')
        svg += [f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="3.5" fill="{color}"/>' for x, y in pts]
        svg.append(f'<rect x="{W - right + 16}" y="{top + 18 * j}" width="10" height="10" fill="{color}"/>')
        svg.append(f'<text x="{W - right + 32}" y="{top + 18 * j + 9}">{escape(name)}</text>')
    svg.append(f'<text x="{left + (W - left - right) / 2}" y="{H - 10}" text-anchor="middle">'
               f'compute ratio (FLOPs per token / dense)</text>')
    svg.append(f'<text transform="translate(14 {top + (H - top - bottom) / 2}) rotate(-90)" '
               f'text-anchor="middle">perplexity / dense perplexity</text>')
    svg.append("</svg>")
    return "\n".join(svg)


def speed_svg(series, title: str) -> str:
    """Speedup over the dense path against density. series: [(label, bench.py rows, modes)]; per
    label a colour: prefill solid, decoding dotted, the prefills' ideal speedup thin and dashed
    (drawn once where two series share it)."""
    W, H, left, right, top, bottom = 700, 360, 60, 250, 40, 48
    lines, ideals = [], set()                            # (label, what, style, width, [(density, speedup)])
    for label, rows, modes in series:
        forced = [r for r in rows if r.get("gates") == "random"]
        for mode, style in (("prefill", ""), ("decode", ' stroke-dasharray="2 3"')):
            pts = sorted((r["density"], r["speedup"]) for r in forced if r["mode"] == mode)
            if pts and mode in modes:
                lines.append((label, mode, style, 2, pts))
        ideal = sorted((r["density"], r["ideal_speedup"]) for r in forced if r["mode"] == "prefill")
        key = tuple(round(y, 1) for _, y in ideal)                             # one model's shapes: one ideal
        if ideal and key not in ideals:
            ideals.add(key)
            lines.append((label, "ideal", ' stroke-dasharray="6 4"', 1, ideal))
    ys = [y for *_, pts in lines for _, y in pts] + [1.0]
    svg, px, py = axes((W, H, left, right, top, bottom), (0.0, 1.0, 0.0, max(ys) * 1.08), title, "{:.1f}")
    palette = ["#4c78a8", "#e45756", "#54a24b", "#f58518", "#b279a2", "#9d755d", "#72b7b2", "#000"]
    colors = {label: palette[i % len(palette)] for i, (label, *_) in enumerate(series)}
    svg.append(f'<line x1="{left}" x2="{W - right}" y1="{py(1):.1f}" y2="{py(1):.1f}" stroke="#888"/>')   # dense
    for j, (label, what, style, width, pts) in enumerate(lines):
        color = colors[label]
        line = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in pts)
        svg.append(f'<polyline points="{line}" fill="none" stroke="{color}" stroke-width="{width}"{style}/>')
        if what != "ideal":
            svg += [f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="3" fill="{color}"/>' for x, y in pts]
        svg.append(f'<line x1="{W - right + 12}" x2="{W - right + 34}" y1="{top + 16 * j + 5}" '
                   f'y2="{top + 16 * j + 5}" stroke="{color}" stroke-width="{width}"{style}/>')
        svg.append(f'<text x="{W - right + 40}" y="{top + 16 * j + 9}">{escape(f"{label}, {what}")}</text>')
    svg.append(f'<text x="{left + (W - left - right) / 2}" y="{H - 10}" text-anchor="middle">'
               f'density (share of tokens each sublayer computes)</text>')
    svg.append(f'<text transform="translate(14 {top + (H - top - bottom) / 2}) rotate(-90)" '
               f'text-anchor="middle">speedup over dense (same code)</text>')
    svg.append("</svg>")
    return "\n".join(svg)


def shade(d: float, lo: float) -> str:
    """A colour for density d on a scale from lo (dark red: skips most) to 1 (near white)."""
    t = max(0.0, min(1.0, (d - lo) / (1 - lo))) if lo < 1 else 1.0
    rgb = [round(a + (b - a) * t) for a, b in zip((165, 15, 21), (247, 247, 247))]
    return "#" + "".join(f"{c:02x}" for c in rgb)


def heatmap_svg(groups, n_layers: int, title: str) -> str:
    """Density per group (rows) and layer (columns), attention and MLP side by side, with each
    group's FLOP-weighted density and token count on the right; a small hand-written SVG.

    groups: [(heading, rows)] with rows as research.studies.study returns them; rows without tokens are left out.
    """
    groups = [(h, [r for r in rows if r["tokens"]]) for h, rows in groups]
    cell, row_h, label_w, gap, top = max(4.0, min(14.0, 300 / n_layers)), 16, 150, 16, 56
    panel = cell * n_layers
    n_rows = sum(len(rows) + 1 for _, rows in groups)
    W, H = label_w + 2 * panel + gap + 190, top + row_h * n_rows + 56
    cells = [r["per_layer"][i][k] for _, rows in groups for r in rows for i in range(n_layers) for k in ("attn", "mlp")]
    lo = min(0.9, int(min(cells) * 10) / 10)                          # colour scale: lo .. 1
    svg = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W:.0f}" height="{H}" font-family="sans-serif" '
           f'font-size="11">',
           f'<text x="{W / 2:.0f}" y="18" text-anchor="middle" font-size="13">{escape(title)}</text>']
    for j, name in enumerate(("attention", "MLP")):
        x0 = label_w + j * (panel + gap)
        svg.append(f'<text x="{x0 + panel / 2:.1f}" y="{top - 20}" text-anchor="middle">{name}, layer 0 → '
                   f'{n_layers - 1}</text>')
    svg.append(f'<text x="{label_w + 2 * panel + gap + 8:.1f}" y="{top - 20}">FLOP-weighted density · tokens</text>')
    y = top
    for heading, rows in groups:
        svg.append(f'<text x="4" y="{y + 12}" font-weight="bold">{escape(heading)}</text>')
        y += row_h
        for r in rows:
            svg.append(f'<text x="{label_w - 6}" y="{y + 12}" text-anchor="end">{escape(r["name"])}</text>')
            for j, k in enumerate(("attn", "mlp")):
                x0 = label_w + j * (panel + gap)
                for i, layer in enumerate(r["per_layer"]):
                    svg.append(f'<rect x="{x0 + i * cell:.1f}" y="{y}" width="{cell:.1f}" height="{row_h - 1}" '
                               f'fill="{shade(layer[k], lo)}"/>')
            svg.append(f'<text x="{label_w + 2 * panel + gap + 8:.1f}" y="{y + 12}">{r["density"]:.3f} · '
                       f'{r["tokens"]}</text>')
            y += row_h
    for i in range(11):                                                # the colour scale
        d = lo + (1 - lo) * i / 10
        svg.append(f'<rect x="{label_w + i * 18}" y="{y + 16}" width="18" height="10" fill="{shade(d, lo)}"/>')
    svg.append(f'<text x="{label_w - 6}" y="{y + 25}" text-anchor="end">density {lo:g}</text>')
    svg.append(f'<text x="{label_w + 11 * 18 + 6}" y="{y + 25}">1 (always computes)</text>')
    svg.append("</svg>")
    return "\n".join(svg)


# ----------------------------------------------------------------------------------------------

def write_plot(path, svg: str):
    try:
        with open(path, "w") as f:
            f.write(svg)
    except OSError as e:
        raise ValueError(f"cannot write --plot={path} ({e}): pick a writable path") from None
    print(f"wrote {path}")


def draw_density(result: str, plot: str):
    """--density: the density per layer of one evaluate.py --ckpt --json result."""
    if not plot:
        raise ValueError(f"--density={result} needs a --plot=FILE.svg to draw into")
    out = read_result(result)
    if "per_layer" not in out:
        raise ValueError(f"{result} holds no density per layer: draw the result of a sparse model against its "
                         "base, python evaluate.py --ckpt=OUT_DIR --text=FILE --json > r.json")
    title = f"{out['model']}: density {out['density']:.2f}, compute ratio {out['compute_ratio']:.2f}"
    write_plot(plot, density_svg(out["per_layer"], title))


def draw_frontier(pattern: str, plot: str):
    """--frontier: one picture of evaluate.py --json results, perplexity ratio vs compute ratio."""
    files = sorted(f for p in pattern.split(",") if p for f in glob.glob(p))
    if not files or not plot:
        raise ValueError(f"--frontier={pattern} needs result files that exist and a --plot=FILE.svg to draw into")
    rows = [read_result(f) for f in files]
    write_plot(plot, frontier_svg(rows, f"{rows[0]['model']}: quality against compute"))


def draw_speed(spec: str, plot: str):
    """--speed: bench.py --json results (LABEL=FILE or FILE, comma-separated; FILE@prefill or
    FILE@decode draws that mode only), speedup vs density."""
    if not plot:
        raise ValueError(f"--speed={spec} needs a --plot=FILE.svg to draw into")
    series = []
    for entry in filter(None, spec.split(",")):
        label, _, path = entry.rpartition("=")
        path, _, mode = path.partition("@")
        if mode not in ("", "prefill", "decode"):
            raise ValueError(f"--speed: {entry} asks for mode {mode!r}: write FILE, FILE@prefill or FILE@decode")
        rows = read_result(path)
        if not isinstance(rows, list) or not any(r.get("gates") == "random" for r in rows):
            raise ValueError(f"{path} holds no rows of forced densities: pass the output of "
                             "python bench.py --densities=1,0.5,0.25 --kv=all --prefill=1x1024 --json")
        label = label or path.rsplit("/", 1)[-1].removesuffix(".json")
        setups = {(r.get("kv"), r.get("batch"), r.get("seq_len")) for r in rows
                  if r.get("gates") == "random" and r["mode"] == "prefill"}
        if len(setups) > 1:
            raise ValueError(f"{path} holds prefills of {len(setups)} setups (kv, batch, length): one line needs "
                             "one, e.g. python bench.py --densities=1,0.5,0.25 --kv=all --prefill=1x1024 --json")
        series.append((label, rows, (mode,) if mode else ("prefill", "decode")))
    write_plot(plot, speed_svg(series, "speed against density: skipped work as time"))


def main(argv):
    config = dict(DEFAULTS, **overrides(DEFAULTS, argv))
    if sum(map(bool, (config["density"], config["frontier"], config["speed"]))) != 1:
        raise ValueError("draw one picture: pass --density=RESULT.json, --frontier='a.json,b*.json' or "
                         "--speed='LABEL=bench.json,...', with --plot=FILE.svg")
    if config["frontier"]:
        return draw_frontier(config["frontier"], config["plot"])
    if config["speed"]:
        return draw_speed(config["speed"], config["plot"])
    draw_density(config["density"], config["plot"])


if __name__ == "__main__":
    run_main(main)
