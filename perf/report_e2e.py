"""Tables and a plot from ``bench_e2e.py``'s ``results.json``: ``results.md`` and ``results.png``.

    python perf/report_e2e.py /tmp/e2e/results.json [--out-dir DIR]

Reads only the JSON, so it can be rerun on old data. Per model: generate() tokens/s per batch
and provider with ours' speed-up over Inductor (> 1: ours faster), ms per decode step, prefill
ms, what was compiled (Dynamo graphs per batch, graphs after warm-up, graph breaks, CUDA-graph
skips, fused regions), the numerics and, if the run profiled, GPU time vs step time.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from perf_common import num as _num
from perf_common import report_main
from perf_common import write_report as _write_report

PROVIDERS = ("eager", "inductor", "ours")
OURS, BASE = "ours", "inductor"
STATUS_MARK = {"failed": "fail", "skipped": "skip", "pending": "?"}


def _ok(rec: dict | None) -> bool:
    return rec is not None and rec.get("status") == "ok"


def _value(rec: dict | None, key: str) -> float | None:
    return _num(rec.get(key)) if _ok(rec) else None


def _cell(rec: dict | None, key: str, spec: str) -> str:
    if rec is None:
        return "-"
    value = _value(rec, key)
    if value is not None:
        return format(value, spec)
    if rec.get("status") == "ok":
        return "-"
    return STATUS_MARK.get(str(rec.get("status")), "?")


def _ratio(num: float | None, den: float | None) -> str:
    if num is None or den is None or den == 0:
        return "-"
    return f"{num / den:.2f}x"


def _err(value: Any) -> str:
    number = _num(value)
    if number is not None:
        return f"{number:.2e}"
    return "-" if value is None else str(value)


def _pct(value: Any) -> str:
    number = _num(value)
    return "-" if number is None else f"{number * 100:.0f}%"


def _md_row(cells: Sequence[Any]) -> str:
    return "| " + " | ".join(str(c).replace("|", "/") for c in cells) + " |"


def _md_table(header: Sequence[str], rows: Sequence[Sequence[Any]], align: str = "r") -> list[str]:
    sep = "|" + "|".join("---:" if (align == "r" and i) else "---" for i in range(len(header)))
    return [_md_row(header), sep + "|", *(_md_row(r) for r in rows)]


# --- indexing ----------------------------------------------------------------------------------


def models(data: dict) -> list[str]:
    order = list((data.get("meta", {}).get("models") or {}).keys())
    for rec in data.get("records", []):
        if rec.get("model") and rec["model"] not in order:
            order.append(rec["model"])
    return order


def providers(data: dict) -> list[str]:
    seen = {rec.get("provider") for rec in data.get("records", [])}
    return [p for p in PROVIDERS if p in seen]


def by_kind(data: dict, model: str, kind: str) -> list[dict]:
    return [r for r in data.get("records", []) if r.get("model") == model and r.get("kind") == kind]


def grid(records: list[dict], key: str) -> dict[int, dict[str, dict]]:
    """records by ``key`` (batch or seq), then provider."""
    out: dict[int, dict[str, dict]] = {}
    for rec in records:
        out.setdefault(int(rec[key]), {})[rec["provider"]] = rec
    return dict(sorted(out.items()))


def _title(data: dict, model: str) -> str:
    spec = (data.get("meta", {}).get("models") or {}).get(model) or {}
    params = (data.get("meta", {}).get("model_params") or {}).get(model)
    parts = [f"{spec.get('label', model)}-shaped ({model})"]
    if spec:
        parts.append(
            f"hidden {spec['hidden']}, intermediate {spec['inter']}, {spec['layers']} layers, "
            f"{spec['heads']}/{spec['kv_heads']} heads, vocab {spec['vocab']}"
        )
    if params:
        parts.append(f"{params / 1e9:.2f} B params")
    return ", ".join(parts)


# --- markdown ------------------------------------------------------------------------------------


def markdown(data: dict) -> str:
    meta = data.get("meta", {})
    provs = providers(data)
    lines = ["# model.generate() end to end: eager vs Inductor vs inductor_fusion", ""]
    lines += _meta_lines(meta)
    for model in models(data):
        lines += ["", f"## {_title(data, model)}"]
        lines += _model_failure_lines(data, model)
        lines += _decode_lines(data, model, provs, meta)
        lines += _prefill_lines(data, model, provs)
        lines += _compile_lines(data, model, provs)
        lines += _numerics_lines(data, model, provs)
        lines += _profile_lines(data, model)
        lines += _problem_lines(data, model)
    return "\n".join(lines) + "\n"


def _meta_lines(meta: dict) -> list[str]:
    versions = ", ".join(
        f"{name} {meta[key]}"
        for name, key in (
            ("torch", "torch"),
            ("triton", "triton"),
            ("transformers", "transformers"),
            ("inductor-fusion", "inductor_fusion"),
            ("CUDA", "cuda"),
            ("python", "python"),
        )
        if meta.get(key)
    )
    elapsed = _num(meta.get("elapsed_s"))
    lines = [
        f"- device: {meta.get('gpu', '?')}; {versions}",
        f"- date: {meta.get('date', '?')}; commit: {meta.get('git_commit') or '?'}"
        + (f"; run took {elapsed:.0f} s" if elapsed else ""),
        f"- {meta.get('dtype', '?')} random-init models built from configs ({meta.get('init', '')})",
        f'- generate(): greedy, `cache_implementation="static"`, {meta.get("prompt", "?")}-token '
        f"prompt, {meta.get('new_tokens', '?')} new tokens (EOS off); compiled providers: "
        f"`CompileConfig(backend=..., mode={meta.get('mode')!r}, dynamic={meta.get('dynamic')})` "
        "(transformers' default mode: "
        f"{meta.get('transformers_compile_config_default', {}).get('mode')!r}); "
        "eager: `disable_compile=True`",
        f"- {meta.get('reps', '?')} timed rounds per cell, medians; tok/s = batch x new tokens / "
        "t(generate); ms/step = (t(N) - t(1)) / (N - 1), per-call CUDA-graph re-record included; "
        "steady = (t(N) - t(N/2)) / (N - N/2)",
        "- ours / inductor: ours' tok/s over Inductor's (> 1: ours faster); fail / skip: see "
        "the notes under each model",
    ]
    if meta.get("quick"):
        lines.append("- **quick run**: fewer models, batches and tokens")
    if meta.get("cpu_smoke"):
        lines.append(
            "- **CPU smoke run** (tiny fp32 model, no CUDA graphs): checks the script, "
            "measures nothing"
        )
    return lines


def _model_failure_lines(data: dict, model: str) -> list[str]:
    return [f"\nModel not built: {rec.get('error')}" for rec in by_kind(data, model, "model")]


def _decode_lines(data: dict, model: str, provs: list[str], meta: dict) -> list[str]:
    rows_by_batch = grid(by_kind(data, model, "decode"), "batch")
    if not rows_by_batch:
        return []
    header = ["batch", *(f"{p} tok/s" for p in provs), "ours / inductor"]
    header += [f"{p} ms/step" for p in provs]
    header += [f"{p} steady" for p in provs]
    rows = []
    for batch, row in rows_by_batch.items():
        cells: list[Any] = [batch]
        cells += [_cell(row.get(p), "tok_s", ".1f") for p in provs]
        cells.append(_ratio(_value(row.get(OURS), "tok_s"), _value(row.get(BASE), "tok_s")))
        cells += [_cell(row.get(p), "step_ms", ".2f") for p in provs]
        cells += [_cell(row.get(p), "steady_step_ms", ".2f") for p in provs]
        rows.append(cells)
    lines = ["", "### Decode: generate() throughput", ""]
    lines += _md_table(header, rows)
    spreads = []
    for p in provs:
        values = [_value(r.get(p), "spread_pct") for r in rows_by_batch.values()]
        values = [v for v in values if v is not None]
        if values:
            spreads.append(f"{p} {max(values):.1f}%")
    if spreads:
        lines += ["", "Largest spread of t(generate) over the timed rounds: " + ", ".join(spreads)]
    return lines


def _prefill_lines(data: dict, model: str, provs: list[str]) -> list[str]:
    rows_by_seq = grid(by_kind(data, model, "prefill"), "seq")
    if not rows_by_seq:
        return []
    header = ["tokens", *(f"{p} ms" for p in provs), "inductor / ours", "ours p10-p90"]
    rows = []
    for seq, row in rows_by_seq.items():
        ours = row.get(OURS)
        p10, p90 = _value(ours, "p10_ms"), _value(ours, "p90_ms")
        rows.append(
            [
                seq,
                *(_cell(row.get(p), "median_ms", ".2f") for p in provs),
                _ratio(_value(row.get(BASE), "median_ms"), _value(ours, "median_ms")),
                "-" if p10 is None or p90 is None else f"{p10:.2f}-{p90:.2f}",
            ]
        )
    lines = [
        "",
        "### Prefill: one forward of [1, S] (torch.compile(model, dynamic=False), median ms)",
        "",
    ]
    return lines + _md_table(header, rows)


def _compile_lines(data: dict, model: str, provs: list[str]) -> list[str]:
    summaries = {r["provider"]: r for r in by_kind(data, model, "compile")}
    if not summaries:
        return []
    header = [
        "provider",
        "decode graphs (by batch)",
        "after warm-up",
        "graph breaks",
        "CUDA-graph skips",
        "fused (decode)",
        "prefill graphs",
        "fused (prefill)",
    ]
    rows = []
    for p in provs:
        rec = summaries.get(p)
        if rec is None:
            continue
        per_batch = rec.get("decode_graphs_by_batch") or {}
        by_batch = ", ".join(f"B{b}: {n}" for b, n in per_batch.items()) or "-"
        layers = rec.get("layers")

        def fused(key: str, graphs_key: str, rec: dict = rec, layers: Any = layers) -> str:
            value = rec.get(key)
            if value is None:
                return "-"
            graphs = rec.get(graphs_key)
            if layers and graphs:
                return f"{value} ({layers} layers x {graphs} graphs = {layers * graphs})"
            return str(value)

        rows.append(
            [
                p,
                f"{rec.get('decode_graphs', '-')} ({by_batch})",
                _dash(rec.get("decode_graphs_after_warmup")),
                f"{_dash(rec.get('decode_graph_breaks'))} / {_dash(rec.get('prefill_graph_breaks'))}",
                _dash(rec.get("decode_cudagraph_skips")),
                fused("decode_fused", "decode_graphs")
                if p == OURS
                else _dash(rec.get("decode_fused")),
                _dash(rec.get("prefill_graphs")),
                fused("prefill_fused", "prefill_graphs")
                if p == OURS
                else _dash(rec.get("prefill_fused")),
            ]
        )
    lines = [
        "",
        "### Compiles",
        "",
        "Dynamo graphs compiled (decode: generate's compiled decode step over the batch sweep; "
        "'after warm-up' counts graphs compiled during the timed and numerics calls and must be "
        "0); graph breaks decode / prefill; regions our pass fused (expected: layers x graphs).",
        "",
    ]
    lines += _md_table(header, rows)
    for p in provs:
        rec = summaries.get(p)
        for key, phase in (
            ("decode_recompile_reasons", "decode"),
            ("prefill_recompile_reasons", "prefill"),
        ):
            reasons = (rec or {}).get(key) or []
            if reasons:
                lines.append("")
                lines.append(f"- {p} {phase} recompiles ({len(reasons)} shown):")
                lines += [f"    - `{r[:300]}`" for r in reasons]
        if rec and rec.get("numerics_error"):
            lines += ["", f"- {p} numerics generate: {rec['numerics_error']}"]
    return lines


def _dash(value: Any) -> str:
    return "-" if value is None else str(value)


def _numerics_lines(data: dict, model: str, provs: list[str]) -> list[str]:
    recs = {r["provider"]: r for r in by_kind(data, model, "numerics")}
    if not recs:
        return []
    ref = next((r.get("ref_dtype") for r in recs.values() if r.get("ref_dtype")), "fp32")
    header = [
        "provider",
        f"first token: rel L2 vs {ref}",
        "vs inductor",
        f"decode step 1: rel L2 vs {ref}",
        "vs inductor",
        "tokens = inductor",
        "prefix = inductor",
        "tokens = eager",
        "within 2x eager",
    ]
    rows = []
    for p in provs:
        rec = recs.get(p)
        if rec is None:
            continue
        if rec.get("status") not in ("ok",):
            rows.append([p, STATUS_MARK.get(str(rec.get("status")), "?"), *["-"] * 7])
            continue
        verdict = rec.get("within_2x_eager")
        rows.append(
            [
                p,
                _err(rec.get("first_logits_rel_l2")),
                _err(rec.get("first_logits_vs_inductor")),
                _err(rec.get("decode1_rel_l2")),
                _err(rec.get("decode1_vs_inductor")),
                _pct(rec.get("tokens_agree_inductor")),
                _pct(rec.get("prefix_agree_inductor")),
                _pct(rec.get("tokens_agree_eager")),
                "-" if verdict is None else ("yes" if verdict else "NO"),
            ]
        )
    any_rec = next(iter(recs.values()))
    gap = _num(any_rec.get("ref_top2_gap_median"))
    n_seq = any_rec.get("numerics_sequences")
    lines = [
        "",
        "### Numerics",
        "",
        "First token: last-position logits of the compiled prefill (first prefill length, 2 "
        "prompts); decode step 1: logits of generate's first compiled decode step; both vs a "
        f"reference model with the same weights in {ref} (TF32 off), relative L2, mean over "
        "prompts. Tokens: share of generated greedy tokens equal"
        + (f" over {n_seq} sequences" if n_seq else "")
        + "; prefix: mean share before the first difference."
        + (
            f" Median top-1 minus top-2 logit of the reference's decode step: {gap:.3g} "
            "(random weights: small gaps make greedy paths sensitive to rounding)."
            if gap is not None
            else ""
        ),
        "",
    ]
    return lines + _md_table(header, rows)


def _profile_lines(data: dict, model: str) -> list[str]:
    recs = [r for r in by_kind(data, model, "decode") if r.get("profile") or r.get("profile_error")]
    if not recs:
        return []
    header = [
        "provider",
        "batch",
        "host step ms",
        "GPU period ms",
        "GPU busy ms",
        "GPU idle",
        "graph launches / step",
        "kernel launches / step",
        "kernels / step",
        "kernel ms / step by kind",
    ]
    rows = []
    notes = []
    for rec in recs:
        prof = rec.get("profile") or {}
        if not prof:
            notes.append(f"- {rec['provider']} B={rec['batch']}: {rec.get('profile_error')}")
            continue
        cats = prof.get("kernel_ms_per_step_by_category") or {}
        idle = _num(prof.get("idle_pct"))
        rows.append(
            [
                rec["provider"],
                rec["batch"],
                _fmt(prof.get("step_ms"), ".3f"),
                _fmt(prof.get("gpu_period_ms"), ".3f"),
                _fmt(prof.get("gpu_busy_ms"), ".3f"),
                "-" if idle is None else f"{idle:.0f}%",
                _dash(prof.get("graph_launches_per_step")),
                _dash(prof.get("kernel_launches_per_step")),
                _dash(prof.get("kernels_per_step")),
                ", ".join(f"{k} {v:.3f}" for k, v in cats.items()) or prof.get("note", "-"),
            ]
        )
    lines = [
        "",
        "### Profile: steady decode steps (torch.profiler, one short generate)",
        "",
        "Host step: time between generate's per-token argmax; GPU period: first kernel of one "
        "step to the next's; busy: union of the step's kernel intervals; idle = 1 - busy / "
        "period (host gaps between graph replays).",
        "",
    ]
    lines += _md_table(header, rows) if rows else []
    lines += ["", *notes] if notes else []
    ours = [
        r
        for r in recs
        if r["provider"] == OURS and (r.get("profile") or {}).get("top_kernels_ms_per_step")
    ]
    if ours:
        top = ours[-1]["profile"]["top_kernels_ms_per_step"]
        lines += ["", f"Top kernels of ours at B={ours[-1]['batch']} (ms per step):", ""]
        lines += _md_table(
            ["kernel", "ms / step"], [[f"`{n[:90]}`", f"{t:.4f}"] for n, t in top], "r"
        )
    return lines


def _fmt(value: Any, spec: str) -> str:
    number = _num(value)
    return "-" if number is None else format(number, spec)


def _problem_lines(data: dict, model: str) -> list[str]:
    problems: dict[tuple[str, str, str, str], list[str]] = {}
    for rec in data.get("records", []):
        if rec.get("model") != model or rec.get("status") not in ("failed", "skipped"):
            continue
        where = (
            f"B={rec['batch']}"
            if rec.get("kind") == "decode"
            else f"S={rec['seq']}"
            if rec.get("kind") == "prefill"
            else ""
        )
        key = (
            rec.get("kind", "?"),
            rec.get("provider") or "-",
            rec["status"],
            str(rec.get("error")),
        )
        problems.setdefault(key, []).append(where)
    if not problems:
        return []
    lines = ["", "Failures and skips:", ""]
    for (kind, provider, status, error), wheres in problems.items():
        at = ",".join(w for w in wheres if w)
        lines.append(f"- {kind} {provider} {status}{' at ' + at if at else ''}: {error}")
    return lines


# --- text table (printed at the end of a run) -------------------------------------------------------


def text_table(data: dict) -> str:
    provs = providers(data)
    out: list[str] = []
    for model in models(data):
        decode = grid(by_kind(data, model, "decode"), "batch")
        prefill = grid(by_kind(data, model, "prefill"), "seq")
        if not decode and not prefill:
            continue
        out.append(f"{model}: generate() tok/s (ms/step)")
        table = [["batch", *provs, "ours/ind"]]
        for batch, row in decode.items():
            cells = []
            for p in provs:
                rec = row.get(p)
                tok, step = _value(rec, "tok_s"), _value(rec, "step_ms")
                if tok is None:
                    cells.append(_cell(rec, "tok_s", ".1f"))
                else:
                    cells.append(f"{tok:.1f} ({'-' if step is None else f'{step:.2f}'})")
            cells.append(_ratio(_value(row.get(OURS), "tok_s"), _value(row.get(BASE), "tok_s")))
            table.append([str(batch), *cells])
        out += _aligned(table)
        if prefill:
            out.append(f"{model}: prefill ms")
            table = [["tokens", *provs, "ind/ours"]]
            for seq, row in prefill.items():
                table.append(
                    [
                        str(seq),
                        *(_cell(row.get(p), "median_ms", ".2f") for p in provs),
                        _ratio(
                            _value(row.get(BASE), "median_ms"), _value(row.get(OURS), "median_ms")
                        ),
                    ]
                )
            out += _aligned(table)
        order = {p: i for i, p in enumerate(PROVIDERS)}
        compiled = sorted(
            by_kind(data, model, "compile"), key=lambda r: order.get(r["provider"], 9)
        )
        for rec in compiled:
            out.append(
                f"  {rec['provider']}: decode graphs {_dash(rec.get('decode_graphs'))} "
                f"(after warm-up {_dash(rec.get('decode_graphs_after_warmup'))}), prefill graphs "
                f"{_dash(rec.get('prefill_graphs'))}, fused {_dash(rec.get('decode_fused'))} / "
                f"{_dash(rec.get('prefill_fused'))}, cudagraph skips "
                f"{_dash(rec.get('decode_cudagraph_skips'))}"
            )
        for rec in by_kind(data, model, "numerics"):
            if rec.get("status") != "ok":
                continue
            out.append(
                f"  numerics {rec['provider']}: first {_err(rec.get('first_logits_rel_l2'))}, "
                f"step1 {_err(rec.get('decode1_rel_l2'))}, tokens=inductor "
                f"{_pct(rec.get('tokens_agree_inductor'))}, within 2x eager "
                f"{_dash(rec.get('within_2x_eager'))}"
            )
        out.append("")
    return "\n".join(out).rstrip()


def _aligned(table: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    return ["  " + "  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in table]


# --- plot ----------------------------------------------------------------------------------------------


def _label(value: float) -> str:
    return f"{value:.0f}" if value >= 100 else f"{value:.3g}"


PANELS = (
    ("decode", "batch", "tok_s", "generate() tokens / s", "batch"),
    ("decode", "batch", "steady_step_ms", "ms per decode step (steady)", "batch"),
    ("prefill", "seq", "median_ms", "prefill ms (median)", "prompt tokens"),
)


def plot(data: dict, path: str | Path) -> None:
    """Per model (column): generate() tok/s and steady ms per decode step by batch, prefill ms
    by length; one bar per provider (ours outlined), linear axes from zero."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [m for m in models(data) if by_kind(data, m, "decode") or by_kind(data, m, "prefill")]
    provs = providers(data)
    cols = max(len(names), 1)
    fig, axes = plt.subplots(
        len(PANELS), cols, figsize=(max(6.5 * cols, 7.5), 3.4 * len(PANELS)), squeeze=False
    )
    width = 0.8 / max(len(provs), 1)
    for col, model in enumerate(names):
        for row_i, (kind, key_field, key, ylabel, xlabel) in enumerate(PANELS):
            ax = axes[row_i][col]
            rows = grid(by_kind(data, model, kind), key_field)
            xs = list(rows)
            for i, p in enumerate(provs):
                values = [_value(rows[x].get(p), key) for x in xs]
                pos = [j + (i - (len(provs) - 1) / 2) * width for j in range(len(xs))]
                bars = ax.bar(
                    pos,
                    [v or 0.0 for v in values],
                    width,
                    label=p,
                    edgecolor="black" if p == OURS else "none",
                    linewidth=1.2 if p == OURS else 0,
                )
                for bar, v in zip(bars, values, strict=True):
                    if v is not None:
                        ax.annotate(
                            _label(v),
                            (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                            ha="center",
                            va="bottom",
                            fontsize=7,
                        )
            ax.set_xticks(range(len(xs)), [str(x) for x in xs])
            ax.set_xlabel(xlabel)
            ax.set_ylabel(ylabel)
            ax.margins(y=0.12)
            ax.set_title(f"{model}: {ylabel}", fontsize=10)
            ax.grid(True, axis="y", alpha=0.3)
            if not xs:
                ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
        axes[0][col].legend(fontsize=8)
    meta = data.get("meta", {})
    fig.suptitle(
        f"generate() end to end, {meta.get('dtype', '?')}, mode {meta.get('mode')!r}\n"
        f"{meta.get('gpu', '?')}, torch {meta.get('torch', '?')}, "
        f"transformers {meta.get('transformers', '?')}",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(data: dict, out_dir: str | Path) -> list[Path]:
    """results.md, and results.png if matplotlib is importable; returns the paths written."""
    return _write_report(data, out_dir, markdown=markdown, plot=plot)


def main(argv: Sequence[str] | None = None) -> int:
    return report_main(argv, producer="bench_e2e.py", write=write_report, text_table=text_table)


if __name__ == "__main__":
    raise SystemExit(main())
