"""FreeProp's ablation on the world benchmark, with the scene-to-scene noise: which differences are real.

    OMP_NUM_THREADS=1 python tests/benchmarks/bench_freeprop.py [--per-edit 1] [--methods i2v,freeprop,...]
        [--json out.json]

Runs the benchmark's engines (nodes/evaluate/bench.py engines(): the bundled FreeProp rows of
nodes/ast_rope/bench.py, i2v, lora_edit, ...) on world_cases(per_edit) held-out scenes with the --quick
settings (10 sampling steps; lora_edit trains 40 steps), one scene at a time through run_bench, and keeps every
scene's scores. Prints per method and edit the mean psnr / edit_psnr / bg_psnr / warp_error, then for each
comparison (freeprop vs each ablation, vs its untrained base and vs i2v) the PAIRED per-scene difference:
mean, its standard error (std / sqrt(n)) and n, overall and per edit. A difference is marked "real" when
|mean| > t SE, t the two-sided 95 % Student quantile for n - 1 degrees of freedom (2.78 for n = 5, 2.03 for
n = 35): the scenes are the noise (each engine is deterministic per scene). Per-edit cells are 7 tests per
comparison and score: about one in 20 is marked by chance; the "all" cell is the finding.
`--from-json FILE` re-reports a saved run without running anything.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import replace

KEYS = ("psnr", "edit_psnr", "bg_psnr", "warp_error")
DEFAULT = "i2v,freeprop,freeprop_no_ast_rope,freeprop_no_teacher,freeprop_untrained"
PAIRS = (("freeprop", "freeprop_no_ast_rope"), ("freeprop", "freeprop_no_teacher"),
         ("freeprop", "freeprop_untrained"), ("freeprop", "i2v"), ("freeprop_no_ast_rope", "i2v"),
         ("freeprop_no_teacher", "i2v"), ("freeprop", "lora_edit"))


def per_scene(per_edit: int, names: tuple[str, ...]) -> list[dict]:
    """[{seed, edit, method: {psnr, ...}}] for world_cases(per_edit) with the quick settings."""
    import torch
    from ffprop.nodes.evaluate.bench import QUICK, engines, run_bench, world_cases

    torch.set_num_threads(1)
    settings = replace(QUICK, cases=world_cases(per_edit))
    methods = engines(settings, names)
    skipped = {n: e for n, e in methods.items() if isinstance(e, str)}
    for n, why in skipped.items():
        print(f"{n}: skipped: {why}", file=sys.stderr)
    rows = []
    for case in settings.cases:
        t0 = time.perf_counter()
        res = run_bench(replace(settings, cases=(case,)), methods)["methods"]
        rows.append({"seed": case[0], "edit": case[1],
                     **{n: {k: m[k] for k in (*KEYS, "seconds")} for n, m in res.items() if n not in skipped}})
        print(json.dumps({"seed": case[0], "edit": case[1], "s": round(time.perf_counter() - t0),
                          **{n: round(r["psnr"], 2) for n, r in rows[-1].items() if isinstance(r, dict)}}),
              file=sys.stderr, flush=True)
    return rows


T95 = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57, 6: 2.45, 7: 2.36, 8: 2.31, 9: 2.26, 10: 2.23, 15: 2.13,
       20: 2.09, 30: 2.04, 34: 2.03, 60: 2.00}     # two-sided 95 % Student t by degrees of freedom (lower entry)


def t95(df: int) -> float:
    return T95[max(k for k in T95 if k <= df)] if df >= 1 else float("inf")


def stats(values: list[float]) -> tuple[float, float, int]:
    """(mean, standard error of the mean, n); SE is nan for n < 2."""
    n = len(values)
    mean = sum(values) / n
    se = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n) if n > 1 else float("nan")
    return mean, se, n


def report(rows: list[dict]) -> str:
    methods = [k for k in rows[0] if isinstance(rows[0][k], dict)]
    edits = list(dict.fromkeys(r["edit"] for r in rows))
    lines = [f"{len(rows)} held-out world scenes; mean per method (psnr / edit_psnr / bg_psnr dB, warp_error)",
             f"{'method':<22}{'edit':<12}" + "".join(f"{k:>11}" for k in KEYS)]
    for m in methods:
        for e in ("all", *edits):
            sel = [r[m] for r in rows if e in ("all", r["edit"])]
            vals = ["-" if not (v := [x[k] for x in sel if x[k] is not None]) else
                    f"{sum(v) / len(v):.4f}" if k == "warp_error" else f"{sum(v) / len(v):.2f}" for k in KEYS]
            lines.append(f"{m if e == 'all' else '':<22}{e:<12}" + "".join(f"{v:>11}" for v in vals))
    lines.append("")
    lines.append("paired per-scene differences A - B (dB): mean +- SE (n); * = real (|mean| > t95(n - 1) SE)")
    for a, b in PAIRS:
        if a not in methods or b not in methods:
            continue
        for k in ("psnr", "edit_psnr", "bg_psnr"):
            cells = []
            for e in ("all", *edits):
                d = [r[a][k] - r[b][k] for r in rows if e in ("all", r["edit"]) and r[a][k] is not None
                     and r[b][k] is not None]
                if not d:
                    continue
                mean, se, n = stats(d)
                real = "*" if n >= 2 and abs(mean) > t95(n - 1) * se else ""
                cells.append(f"{e} {mean:+.2f}" + (f"+-{se:.2f}" if math.isfinite(se) else "") + f" ({n}){real}")
            lines.append(f"{a} - {b} [{k}]: " + "; ".join(cells))
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--per-edit", type=int, default=1, help="held-out scenes per edit (1 = --quick's 7 scenes)")
    p.add_argument("--methods", default=DEFAULT)
    p.add_argument("--json", default=None, help="write the per-scene rows here")
    p.add_argument("--from-json", default=None, help="only report the per-scene rows saved by --json")
    a = p.parse_args(argv)
    if a.from_json:
        print(report(json.loads(open(a.from_json).read())))
        return 0
    t0 = time.perf_counter()
    rows = per_scene(a.per_edit, tuple(m.strip() for m in a.methods.split(",") if m.strip()))
    print(report(rows))
    print(f"{len(rows)} scenes in {time.perf_counter() - t0:.0f} s")
    if a.json:
        from ffprop.nodes.common import atomic_write

        with atomic_write(a.json) as tmp:
            tmp.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
