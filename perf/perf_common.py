"""Helpers shared by the benchmarks (bench.py, bench_e2e.py) and their reports.

The scripts run as ``python perf/<script>.py``, so this folder is on ``sys.path`` and they import
this module by its bare name. Nothing here runs at import time.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

# --- benchmarks ------------------------------------------------------------------------------------


def log(msg: str) -> None:
    print(msg, flush=True)


def csv_list(text: str) -> list[str]:
    return [item.strip() for item in str(text).split(",") if item.strip()]


def error_text(exc: BaseException, limit: int = 600) -> str:
    text = f"{type(exc).__name__}: {exc}".strip()
    return text if len(text) <= limit else text[: limit - 3] + "..."


def rel_l2(out: Any, ref: Any) -> float:
    """‖out − ref‖ / ‖ref‖ in fp64 (NaN if ``out`` holds a NaN or Inf)."""
    out, ref = out.double().cpu(), ref.double().cpu()
    return float((out - ref).norm() / ref.norm())


def synchronize(device: Any) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def recover() -> None:
    """After a failure or a block of work: settle the device and give cached blocks back."""
    import torch

    if torch.cuda.is_available():
        try:
            torch.cuda.synchronize()
        except Exception as exc:
            log(f"    (synchronize after failure raised {error_text(exc, 200)})")
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def configure_compiler() -> None:
    """Compiler settings for a benchmark process (the script's main, never the library)."""
    import torch._dynamo.config as dynamo_config
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    # Providers recompile once per shape (static shapes): keep all of the graphs.
    dynamo_config.recompile_limit = 64
    dynamo_config.accumulated_recompile_limit = 4096
    # A graph-cache hit would skip our pass (the fused-region checks could not see it) and make
    # compile times depend on what ran before: every compile is a fresh one.
    inductor_config.fx_graph_cache = False
    functorch_config.enable_autograd_cache = False


def dist_version(dist: str) -> str | None:
    """Installed version of a distribution (e.g. "liger-kernel"), or None."""
    try:
        from importlib.metadata import version

        return version(dist)
    except Exception:
        return None


def git_commit() -> str | None:
    try:
        here = Path(__file__).resolve().parent
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain"], cwd=here, capture_output=True, text=True, timeout=10
        )
        commit = out.stdout.strip() if out.returncode == 0 else None
        if commit and dirty.stdout.strip():
            commit += " (dirty)"
        return commit
    except Exception:
        return None


# --- reports ---------------------------------------------------------------------------------------


def load(path: str | Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text())


def num(value: Any) -> float | None:
    """A finite float, or None (missing, 'nan' string, bool, non-numeric)."""
    if isinstance(value, bool):
        return None
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


def write_report(
    data: dict,
    out_dir: str | Path,
    *,
    markdown: Callable[[dict], str],
    plot: Callable[[dict, Path], None],
) -> list[Path]:
    """results.md, and results.png if matplotlib is importable; returns the paths written."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    md = out_dir / "results.md"
    md.write_text(markdown(data))
    written = [md]
    png = out_dir / "results.png"
    try:
        plot(data, png)
        written.append(png)
    except ImportError as exc:
        print(f"report: no plot ({exc})", flush=True)
    return written


def report_main(
    argv: Sequence[str] | None,
    *,
    producer: str,
    write: Callable[[dict, Path], list[Path]],
    text_table: Callable[[dict], str],
) -> int:
    """The command line of a report module: results.json in, results.md/png out."""
    parser = argparse.ArgumentParser(description="results.md and results.png from results.json")
    parser.add_argument("json", type=Path, help=f"results.json written by {producer}")
    parser.add_argument("--out-dir", type=Path, help="default: the JSON's folder")
    args = parser.parse_args(argv)
    data = load(args.json)
    written = write(data, args.out_dir or args.json.parent)
    print("wrote " + ", ".join(str(p) for p in written))
    print(text_table(data))
    return 0
