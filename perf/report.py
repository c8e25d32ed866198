"""Tables and a plot from ``bench.py``'s ``results.json``: ``results.md`` and ``results.png``.

    python perf/report.py perf/results/results.json [--out-dir DIR]

Reads only the JSON, so it can be rerun on old data (records without a kind are Llama's). Tables
are grouped by family kind (Llama, Gemma, Phi-3, GPT-NeoX, Nemotron), one per shape. Columns: the
floor, every provider's median µs, ours' time as a percentage of the floor (100% = at the roof),
and ours' speed-up over the best peer (best of eager / liger / compile / max_autotune: > 1 means
ours is faster).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from perf_common import num as _num
from perf_common import report_main
from perf_common import write_report as _write_report

PEERS = ("eager", "liger", "compile", "max_autotune")
PROVIDERS = (*PEERS, "ours", "ours_op")
OURS = "ours"
MODELS = {
    "2048x8192": "Llama-3.2-1B",
    "3072x8192": "Llama-3.2-3B",
    "4096x14336": "Llama-3.1-8B",
    "gemma:2304x9216": "Gemma-2-2B",
    "phi3:3072x8192": "Phi-3-mini",
    "neox:2560x10240": "Pythia-2.8B",
    "nemotron:3072x9216": "Nemotron-Mini-4B",
}
NOT_FUSED = "*"  # marks ours where it left the region to Inductor (above the profitability limit)
STATUS_MARK = {"failed": "fail", "skipped": "skip", "pending": "?"}


def _time(rec: dict | None) -> float | None:
    if rec is None or rec.get("status") != "ok":
        return None
    return _num(rec.get("median_us"))


def fmt_us(value: float | None) -> str:
    if value is None:
        return "-"
    if value >= 1000:
        return f"{value:.0f}"
    return f"{value:.1f}"


def _cell(rec: dict | None) -> str:
    if rec is None:
        return "-"
    t = _time(rec)
    if t is not None:
        return fmt_us(t) + (NOT_FUSED if rec.get("fused") == 0 else "")
    return STATUS_MARK.get(rec.get("status", ""), "?")


def index(data: dict) -> dict[str, dict[int, dict[str, dict]]]:
    """records by shape, then M, then provider (shapes grouped by kind, in the run's order)."""
    order = data.get("meta", {}).get("shapes") or []
    out: dict[str, dict[int, dict[str, dict]]] = {key: {} for key in order}
    for rec in data.get("records", []):
        out.setdefault(rec["shape"], {}).setdefault(int(rec["m"]), {})[rec["provider"]] = rec
    shapes = [k for k, v in out.items() if v]
    kinds = list(dict.fromkeys(kind_of(out[k]) for k in shapes))
    return {k: out[k] for k in sorted(shapes, key=lambda k: kinds.index(kind_of(out[k])))}


def kind_of(rows: dict[int, dict[str, dict]]) -> str:
    """The family kind of one shape's records (old records have none: Llama's)."""
    rec = next(iter(next(iter(rows.values())).values()))
    return rec.get("kind") or "llama"


def _kind_heading(kind: str, rows: dict[int, dict[str, dict]], meta: dict) -> str:
    info = (meta.get("kinds") or {}).get(kind) or {}
    rec = next(iter(next(iter(rows.values())).values()))
    family = rec.get("family") or info.get("family") or "rmsnorm_mlp"
    region = info.get("region") or ("h + LlamaMLP(LlamaRMSNorm(h))" if kind == "llama" else "?")
    return f"{kind} ({family}): {region}"


def providers_present(data: dict) -> list[str]:
    seen = {rec["provider"] for rec in data.get("records", [])}
    return [p for p in PROVIDERS if p in seen]


def best_peer(row: dict[str, dict]) -> tuple[str, float] | None:
    times = [(p, t) for p in PEERS if (t := _time(row.get(p))) is not None]
    return min(times, key=lambda pt: pt[1]) if times else None


def row_summary(row: dict[str, dict]) -> dict[str, Any]:
    """Floor, ours % of floor, and ours' speed-up over the best peer for one (shape, M)."""
    any_rec = next(iter(row.values()))
    floor = _num(any_rec.get("floor_us"))
    ours = _time(row.get(OURS))
    peer = best_peer(row)
    return {
        "floor": floor,
        "bound": any_rec.get("floor_bound"),
        "ours_pct": ours / floor * 100 if ours is not None and floor else None,
        "best_peer": peer[0] if peer else None,
        "speedup": peer[1] / ours if peer and ours else None,
    }


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}%"


def _speedup(summary: dict) -> str:
    if summary["speedup"] is None:
        return "-"
    return f"{summary['speedup']:.2f}x ({summary['best_peer']})"


def _title(shape: str) -> str:
    """'H x I = 2048x8192 (Llama-3.2-1B)', 'gemma H x I = 2304x9216 (Gemma-2-2B)'."""
    kind, _, size = shape.rpartition(":")
    model = MODELS.get(shape)
    return f"{kind + ' ' if kind else ''}H x I = {size}" + (f" ({model})" if model else "")


# --- markdown ------------------------------------------------------------------------------------


def markdown(data: dict) -> str:
    meta = data.get("meta", {})
    providers = providers_present(data)
    lines = ["# norm → MLP → residual: benchmark", ""]
    lines += _meta_lines(meta)
    kind = None
    for shape, rows in index(data).items():
        if kind_of(rows) != kind:
            kind = kind_of(rows)
            lines += ["", f"## {_kind_heading(kind, rows, meta)}"]
        lines += ["", f"### {_title(shape)}", ""]
        header = ["M", "floor µs", *providers, "ours / floor", "ours vs best peer"]
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "---:|" * len(header))
        for m in sorted(rows):
            row = rows[m]
            summary = row_summary(row)
            cells = [str(m), fmt_us(summary["floor"])]
            cells += [_cell(row.get(p)) for p in providers]
            cells += [_pct(summary["ours_pct"]), _speedup(summary)]
            lines.append("| " + " | ".join(cells) + " |")
        lines += _spread_lines(rows, providers)
        lines += _variant_lines(rows)
        lines += _problem_lines(rows, providers)
    lines += _numerics_lines(data, providers)
    lines += _distribution_lines(data, providers)
    lines += _compile_lines(data, providers)
    return "\n".join(lines) + "\n"


def _meta_lines(meta: dict) -> list[str]:
    copy_bw, mm_rate = _num(meta.get("copy_bw")), _num(meta.get("mm_rate"))
    timing = meta.get("timing") or {}
    versions = ", ".join(
        f"{name} {meta[key]}"
        for name, key in (
            ("torch", "torch"),
            ("triton", "triton"),
            ("transformers", "transformers"),
            ("liger-kernel", "liger_kernel"),
            ("CUDA", "cuda"),
            ("python", "python"),
        )
        if meta.get(key)
    )
    lines = [
        f"- GPU: {meta.get('gpu', '?')}; {versions}",
        f"- date: {meta.get('date', '?')}; commit: {meta.get('git_commit') or '?'}"
        + (f"; {meta['elapsed_s']:.0f} s" if _num(meta.get("elapsed_s")) else ""),
    ]
    if copy_bw and mm_rate:
        lines.append(
            f"- measured in this run: copy {copy_bw / 1e12:.2f} TB/s (bytes read + written), "
            f"bf16 matmul {mm_rate / 1e12:.0f} TFLOP/s"
        )
    lines += [
        f"- {meta.get('benchmark', 'the region')}, {meta.get('dtype', 'bf16')}, "
        f"h of shape {meta.get('input_shape', '[1, M, H]')}; {meta.get('init', '')}",
        "- times: median µs per call, CUDA-graph replay of "
        f"{timing.get('calls_per_graph', '?')} calls, {timing.get('rounds', '?')} interleaved "
        f"rounds x {timing.get('replays_per_round', '?')} replays; "
        "floor = max(bytes / copy BW, flops / matmul rate) with bytes = (W·H·I + MLP biases + "
        "2·M·H)·2 (weights once, h in, out), flops = 2·W·M·H·I, W = 3 weight matrices for a "
        "gated MLP, 2 for a non-gated one",
        "- ours / floor: ours' time over the floor (100% = at the roof); "
        "ours vs best peer: best peer's time / ours' (> 1: ours faster); "
        "fail / skip: see the notes under the table",
        f"- {NOT_FUSED}: ours did not fuse there on purpose (above its profitability limit the "
        "region is Inductor's own code)",
    ]
    if meta.get("quick"):
        lines.append("- **quick run** (smoke test): fewer shapes, M and repeats")
    if meta.get("cpu_smoke"):
        lines.append(
            "- **CPU smoke run**: tiny sizes, fp32, wall-clock times; checks the script only"
        )
    return lines


def _spread_lines(rows: dict[int, dict[str, dict]], providers: Sequence[str]) -> list[str]:
    spreads = []
    for p in providers:
        values = [
            s
            for row in rows.values()
            if _time(row.get(p)) is not None and (s := _num(row[p].get("spread_pct"))) is not None
        ]
        if values:
            spreads.append(f"{p} {max(values):.1f}%")
    if not spreads:
        return []
    return ["", "Largest spread of round medians (same version timed again): " + ", ".join(spreads)]


def _variant_lines(rows: dict[int, dict[str, dict]]) -> list[str]:
    """Which registered variant of our pass fused the region, with the M it did so at."""
    variants: dict[str, list[int]] = {}
    for m in sorted(rows):
        rec = rows[m].get(OURS)
        if rec and rec.get("variant"):
            variants.setdefault(rec["variant"], []).append(m)
    if not variants:
        return []
    text = "; ".join(f"{v} at M={','.join(str(m) for m in ms)}" for v, ms in variants.items())
    return ["", f"Fused by ours: {text}"]


def _problem_lines(rows: dict[int, dict[str, dict]], providers: Sequence[str]) -> list[str]:
    """One line per (provider, message) with the M it happened at."""
    problems: dict[tuple[str, str, str], list[int]] = {}
    for m in sorted(rows):
        for p in providers:
            rec = rows[m].get(p)
            if rec and rec.get("status") in ("failed", "skipped"):
                key = (p, rec["status"], str(rec.get("error") or "no message"))
                problems.setdefault(key, []).append(m)
    if not problems:
        return []
    lines = [""]
    for (p, status, error), ms in problems.items():
        where = "M=" + ",".join(str(m) for m in ms)
        lines.append(f"- {p} {status} at {where}: {error.replace('|', '/')}")
    return lines


def _numerics_lines(data: dict, providers: Sequence[str]) -> list[str]:
    rows = [rec for rec in data.get("records", []) if rec.get("rel_err") is not None]
    if not rows:
        return []
    lines = [
        "",
        "## Numerics",
        "",
        "Relative L2 error vs an fp32 reference (fp64 in a CPU smoke run: the HF modules "
        "upcast, TF32 off), on a fresh input. Our rule: ours ≤ 2 x eager's error.",
        "",
        "| shape | M | " + " | ".join(providers) + " | ours within 2x eager |",
        "|---|---:|" + "---:|" * len(providers) + "---|",
    ]
    by_block: dict[tuple[str, int], dict[str, dict]] = {}
    for rec in rows:
        by_block.setdefault((rec["shape"], int(rec["m"])), {})[rec["provider"]] = rec
    for (shape, m), recs in by_block.items():
        cells = []
        for p in providers:
            rec = recs.get(p)
            err = None if rec is None else rec.get("rel_err")
            cells.append("-" if err is None else _fmt_err(err))
        verdicts = [
            f"{p}: {'yes' if recs[p].get('tol_ok') else 'NO'}"
            for p in ("ours", "ours_op")
            if p in recs and recs[p].get("tol_ok") is not None
        ]
        lines.append(
            f"| {shape} | {m} | " + " | ".join(cells) + f" | {', '.join(verdicts) or '-'} |"
        )
    return lines


def _fmt_err(err: Any) -> str:
    value = _num(err)
    return f"{value:.2e}" if value is not None else str(err)


def _distribution_lines(data: dict, providers: Sequence[str]) -> list[str]:
    """p10 / p90 of every timed cell: how wide each median's samples were."""
    lines = ["", "## Spread of the samples: p10 / p90 µs per call"]
    for shape, rows in index(data).items():
        lines += [
            "",
            f"{_title(shape)}",
            "",
            "| M | " + " | ".join(providers) + " |",
            "|---:|" + "---:|" * len(providers),
        ]
        for m in sorted(rows):
            cells = []
            for p in providers:
                rec = rows[m].get(p)
                lo, hi = (
                    (None, None) if _time(rec) is None else (rec.get("p10_us"), rec.get("p90_us"))
                )
                lo, hi = _num(lo), _num(hi)
                cells.append("-" if lo is None or hi is None else f"{fmt_us(lo)} / {fmt_us(hi)}")
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return lines


def _compile_lines(data: dict, providers: Sequence[str]) -> list[str]:
    totals: dict[str, dict[str, float]] = {}
    for rec in data.get("records", []):
        seconds = _num(rec.get("compile_s"))
        if seconds is not None:
            shape_totals = totals.setdefault(rec["shape"], {})
            shape_totals[rec["provider"]] = shape_totals.get(rec["provider"], 0.0) + seconds
    if not totals:
        return []
    lines = [
        "",
        "## First-call time (compile, autotune), seconds summed over M",
        "",
        "| shape | " + " | ".join(providers) + " |",
        "|---|" + "---:|" * len(providers),
    ]
    for shape, per in totals.items():
        cells = [f"{per[p]:.1f}" if p in per else "-" for p in providers]
        lines.append(f"| {shape} | " + " | ".join(cells) + " |")
    return lines


# --- text table (printed at the end of a run) -------------------------------------------------------


def text_table(data: dict) -> str:
    providers = providers_present(data)
    short = {"max_autotune": "max_at", "ours_op": "ours_op"}
    out = []
    for shape, rows in index(data).items():
        header = ["M", "floor", *(short.get(p, p) for p in providers), "ours/flr", "vs best"]
        table = [header]
        for m in sorted(rows):
            summary = row_summary(rows[m])
            speed = "-" if summary["speedup"] is None else f"{summary['speedup']:.2f}x"
            table.append(
                [
                    str(m),
                    fmt_us(summary["floor"]),
                    *(_cell(rows[m].get(p)) for p in providers),
                    _pct(summary["ours_pct"]),
                    speed,
                ]
            )
        widths = [max(len(r[i]) for r in table) for i in range(len(header))]
        out.append(f"{shape} (median µs per call)")
        out += ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in table]
        out.append("")
    for rec in data.get("records", []):
        if rec.get("tol_ok") is False:
            out.append(
                f"NUMERICS: {rec['provider']} at {rec['shape']} M={rec['m']}: rel err "
                f"{_fmt_err(rec.get('rel_err'))} > 2 x eager"
            )
    return "\n".join(out).rstrip()


# --- plot ----------------------------------------------------------------------------------------------


def plot(data: dict, path: str | Path) -> None:
    """Per shape: median µs vs M on log axes, one line per provider, the floor dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = index(data)
    providers = providers_present(data)
    cols = min(max(len(shapes), 1), 4)
    rows_ = -(-max(len(shapes), 1) // cols)
    fig, axes = plt.subplots(rows_, cols, figsize=(5.5 * cols, 4.5 * rows_), squeeze=False)
    for ax in axes.flat[len(shapes) :]:
        ax.set_visible(False)
    for ax, (shape, rows) in zip(axes.flat, shapes.items(), strict=False):
        ms = sorted(rows)
        floors = [row_summary(rows[m])["floor"] for m in ms]
        if None not in floors:  # none in a CPU smoke run
            ax.plot(ms, floors, "k--", linewidth=1.5, label="floor")
        for p in providers:
            points = [(m, t) for m in ms if (t := _time(rows[m].get(p))) is not None]
            if points:
                xs, ys = zip(*points, strict=True)
                width = 2.4 if p == OURS else 1.2
                ax.plot(xs, ys, marker="o", markersize=3.5, linewidth=width, label=p)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(ms, [str(m) for m in ms])
        ax.minorticks_off()
        ax.tick_params(axis="x", labelsize=8)
        ax.set_xlabel("tokens M")
        ax.set_ylabel("µs per call (median)")
        ax.set_title(_title(shape), fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    meta = data.get("meta", {})
    fig.suptitle(
        f"h + mlp(norm(h)), {meta.get('dtype', 'bfloat16')}, {meta.get('gpu', '?')}, "
        f"torch {meta.get('torch', '?')}",
        fontsize=11,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(data: dict, out_dir: str | Path) -> list[Path]:
    """results.md, and results.png if matplotlib is importable; returns the paths written."""
    return _write_report(data, out_dir, markdown=markdown, plot=plot)


def main(argv: Sequence[str] | None = None) -> int:
    return report_main(argv, producer="bench.py", write=write_report, text_table=text_table)


if __name__ == "__main__":
    raise SystemExit(main())
