"""Tables and a plot from a pytest-benchmark JSON of the bench/ suites.

    pytest bench --benchmark-only --benchmark-json=results.json
    python -m bench.scripts.report results.json [--png ratios.png] [--md report.md]

For every benchmark group (one shape × dtype × pass × γ mode, or one model
scenario) it prints each case's median time as a ratio to the ``linear`` and
to the ``naive`` case of the same group in the same run, with the peak memory
and throughput recorded in ``extra_info``. ``--png`` saves a bar chart of the
ratios to ``linear`` per shape (Agg backend, no display needed); ``--md``
writes the Markdown to a file as well as printing it.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from collections import OrderedDict

IMPL_ORDER = ["linear", "naive", "torch", "triton", "fused", "fused-auto", "fused-triton", "export"]
PASS_ORDER = ["fwd", "fwdbwd-frozenW", "fwdbwd-trainW"]
GAMMA_ORDER = ["shared", "per_sample"]


def _impl_key(impl: str):
    return (IMPL_ORDER.index(impl) if impl in IMPL_ORDER else len(IMPL_ORDER), impl)


def fmt_time(s: float | None) -> str:
    if s is None:
        return "–"
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("µs", 1e-6)):
        if s >= scale:
            return f"{s / scale:.3g} {unit}"
    return f"{s / 1e-9:.3g} ns"


def fmt_bytes(b) -> str:
    if b is None:
        return "–"
    b = float(b)
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if b >= scale:
            return f"{b / scale:.3g} {unit}"
    return f"{b:.0f} B"


def fmt_ratio(x: float | None) -> str:
    return "–" if x is None else f"{x:.2f}×"


def fmt_num(x, digits=3) -> str:
    if x is None:
        return "–"
    return f"{x:.{digits}g}"


def load(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def rows_from(data: dict) -> list[dict]:
    """One row per benchmark: group, impl, median seconds and the extra_info fields."""
    rows = []
    for b in data.get("benchmarks", []):
        info = b.get("extra_info", {}) or {}
        stats = b.get("stats") or {}
        rows.append(dict(
            group=b.get("group") or b.get("name"),
            name=b.get("name"),
            impl=info.get("impl", b.get("param") or b.get("name")),
            median=stats.get("median"),
            info=info,
        ))
    return rows


def grouped(rows: list[dict]) -> "OrderedDict[str, list[dict]]":
    groups: "OrderedDict[str, list[dict]]" = OrderedDict()
    for r in rows:
        groups.setdefault(r["group"], []).append(r)
    for g in groups.values():
        g.sort(key=lambda r: _impl_key(r["impl"]))
        base = {r["impl"]: r["median"] for r in g}
        for r in g:
            m = r["median"]
            r["x_linear"] = m / base["linear"] if m and base.get("linear") else None
            r["x_naive"] = m / base["naive"] if m and base.get("naive") else None
    return groups


def op_table(groups) -> list[str]:
    """Detailed table of the op-level groups (extra_info has 'pass')."""
    lines = [
        "| shape | dtype | pass | γ | impl | median | × linear | × naive | peak mem | TFLOP/s | GB/s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    n = 0
    for rows in groups.values():
        for r in rows:
            i = r["info"]
            if "pass" not in i:
                continue
            shape = f"{i.get('shape')} {i.get('tokens')}tok {i.get('d_in')}→{i.get('d_out')}"
            lines.append(
                f"| {shape} | {i.get('dtype')} | {i.get('pass')} | {i.get('gamma')} | {r['impl']} | "
                f"{fmt_time(r['median'])} | {fmt_ratio(r['x_linear'])} | {fmt_ratio(r['x_naive'])} | "
                f"{fmt_bytes(i.get('peak_mem_bytes'))} | {fmt_num(i.get('tflops'))} | {fmt_num(i.get('gbps'))} |"
            )
            n += 1
    return lines if n else []


def op_summary(groups) -> list[str]:
    """Compact pivot: one line per (shape, dtype, pass, γ), the × linear of each impl."""
    impls = sorted({r["impl"] for g in groups.values() for r in g if "pass" in r["info"]}, key=_impl_key)
    impls = [i for i in impls if i != "linear"]
    if not impls:
        return []
    lines = [
        "| shape | dtype | pass | γ | linear (time) | " + " | ".join(f"{i} × linear" for i in impls) + " |",
        "|---|---|---|---|---|" + "---|" * len(impls),
    ]
    for rows in groups.values():
        if not rows or "pass" not in rows[0]["info"]:
            continue
        i = rows[0]["info"]
        by = {r["impl"]: r for r in rows}
        lin = by.get("linear")
        shape = f"{i.get('shape')} {i.get('d_in')}→{i.get('d_out')}"
        cells = [fmt_ratio(by[m]["x_linear"]) if m in by else "–" for m in impls]
        lines.append(f"| {shape} | {i.get('dtype')} | {i.get('pass')} | {i.get('gamma')} | "
                     f"{fmt_time(lin['median']) if lin else '–'} | " + " | ".join(cells) + " |")
    return lines


def model_table(groups) -> list[str]:
    lines = [
        "| scenario | conversion | dtype | size | impl | layer impl | median | × naive | images/s | peak mem |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    n = 0
    for g, rows in groups.items():
        for r in rows:
            i = r["info"]
            if "pass" in i:
                continue
            scen = i.get("scenario") or str(g).replace("|", "/")
            if scen == "serve":
                scen = f"serve {i.get('images')} requests, per-sample γ"
            elif scen == "train":
                scen = f"train step, batch {i.get('images')}"
            lines.append(f"| {scen} | {i.get('conversion', '–')} | {i.get('dtype', '–')} | {i.get('size', '–')} | "
                         f"{r['impl']} | {i.get('layer_impl', '–')} | {fmt_time(r['median'])} | {fmt_ratio(r['x_naive'])} | "
                         f"{fmt_num(i.get('images_per_s'), 4)} | {fmt_bytes(i.get('peak_mem_bytes'))} |")
            n += 1
    return lines if n else []


def markdown(data: dict, source: str) -> str:
    groups = grouped(rows_from(data))
    mi = data.get("machine_info", {})
    cpu = (mi.get("cpu") or {}).get("brand_raw") or mi.get("processor") or "?"
    out = ["# pmkernels benchmark report", "",
           f"Source: `{source}`, {data.get('datetime', '?')}; machine: {mi.get('node', '?')} ({cpu}); "
           f"commit {str((data.get('commit_info') or {}).get('id', '?'))[:10]}.", "",
           "Ratios are median times over the `linear` (plain `F.linear`) and `naive` (materialise W(γ)) cases "
           "of the same group in the same run; lower is better. Peak memory: see bench/README.md.", ""]
    s = op_summary(groups)
    if s:
        out += ["## Op level: time as a multiple of F.linear", ""] + s + [""]
    t = op_table(groups)
    if t:
        out += ["## Op level: all cases", ""] + t + [""]
    m = model_table(groups)
    if m:
        out += ["## Model level", ""] + m + [""]
    return "\n".join(out)


def plot(data: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    groups = grouped(rows_from(data))
    panels: "OrderedDict[tuple, dict]" = OrderedDict()  # (shape label, dtype) -> {(pass, γ): {impl: ratio}}
    for rows in groups.values():
        for r in rows:
            i = r["info"]
            if "pass" not in i or r["impl"] == "linear" or r["x_linear"] is None:
                continue
            key = (f"{i.get('shape')} {i.get('tokens')}tok {i.get('d_in')}→{i.get('d_out')}", i.get("dtype"))
            panels.setdefault(key, {}).setdefault((i["pass"], i["gamma"]), {})[r["impl"]] = r["x_linear"]
    if not panels:
        print("no op-level results to plot", file=sys.stderr)
        return
    impls = sorted({m for p in panels.values() for c in p.values() for m in c}, key=_impl_key)
    colors = {"naive": "tab:red", "torch": "tab:blue", "triton": "tab:green"}
    ncols = min(3, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.2 * ncols, 3.9 * nrows), squeeze=False)
    width = 0.8 / max(1, len(impls))
    for ax, ((label, dtype), cases) in zip(axes.flat, panels.items()):
        keys = sorted(cases, key=lambda k: (PASS_ORDER.index(k[0]) if k[0] in PASS_ORDER else 9,
                                            GAMMA_ORDER.index(k[1]) if k[1] in GAMMA_ORDER else 9))
        for j, impl in enumerate(impls):
            xs = [n + (j - (len(impls) - 1) / 2) * width for n in range(len(keys))]
            ys = [cases[k].get(impl, float("nan")) for k in keys]
            ax.bar(xs, ys, width, label=impl, color=colors.get(impl))
        ax.axhline(1.0, color="black", lw=1, ls="--")
        ax.set_yscale("log")
        fmt = FuncFormatter(lambda v, _: f"{v:g}×")
        ax.yaxis.set_major_formatter(fmt)
        ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}×" if str(f"{v:g}")[0] in "25" else ""))
        ax.tick_params(axis="y", which="both", labelsize=7)
        ax.set_xticks(range(len(keys)))
        short = {"fwd": "fwd", "fwdbwd-frozenW": "fwd+bwd\nfrozen W", "fwdbwd-trainW": "fwd+bwd\ntrain W"}
        ax.set_xticklabels([f"{short.get(p, p)}\n{'per-sample' if g == 'per_sample' else 'shared'} γ"
                            for p, g in keys], fontsize=7)
        ax.set_title(f"{label} ({dtype})", fontsize=9)
        ax.set_ylabel("time / F.linear (log)", fontsize=8)
        ax.grid(axis="y", which="both", alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper right", ncol=len(impls), fontsize=9)
    fig.suptitle("pareto_linear: median time as a multiple of F.linear (dashed line = 1×)", fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.scripts.report", description=__doc__.split("\n\n")[0])
    ap.add_argument("results", help="pytest-benchmark JSON (from --benchmark-json)")
    ap.add_argument("--png", help="save the ratio plot here")
    ap.add_argument("--md", help="also write the Markdown report here")
    args = ap.parse_args(argv)
    data = load(args.results)
    if not data.get("benchmarks"):
        print(f"{args.results}: no benchmarks in this file", file=sys.stderr)
        return 1
    text = markdown(data, args.results)
    print(text)
    if args.md:
        with open(args.md, "w") as f:
            f.write(text + "\n")
    if args.png:
        plot(data, args.png)
        print(f"\nplot saved to {args.png}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
