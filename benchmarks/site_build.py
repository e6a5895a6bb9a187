"""What the website build costs: site_gen's page generation vs the MkDocs build it feeds.

For the real catalogue and a synthetic 10,000-paper one (benchmarks/scale.py), each run in
fresh processes: (1) generation alone, i.e. what the MkDocs hook does (load + check, then
render the pages) and the rendering step by itself; (2) the full `mkdocs build --strict`,
which includes (1). Prints medians as a Markdown table; target: generation <= 10 % of the build.

    .venv/bin/python benchmarks/site_build.py [--sizes 10000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scale import synthetic_catalogue  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

GENERATE = r"""
import json, sys, time
from pathlib import Path
t0, c0 = time.perf_counter(), time.process_time()
from site_gen.pipeline import run
from site_gen.site import SiteOptions, render_site
result = run(Path(sys.argv[1]))
assert not result.problems.errors, [p.format() for p in result.problems.errors][:3]
t1, c1 = time.perf_counter(), time.process_time()
cat = result.catalogue
files, _ = render_site(cat, SiteOptions(), bib=result.outputs.get(cat.root / "catalog.bib"))
t2, c2 = time.perf_counter(), time.process_time()
print(json.dumps({"total": t2 - t0, "total_cpu": c2 - c0, "render": t2 - t1, "render_cpu": c2 - c1,
                  "pages_mb": sum(len(t) for t in files.values()) / 1e6, "papers": len(cat.papers)}))
"""


def child_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def generate(catalog: Path) -> dict[str, float]:
    out = subprocess.run([sys.executable, "-c", GENERATE, str(catalog)], capture_output=True, text=True, cwd=ROOT)
    if out.returncode:
        sys.exit(out.stderr[-2000:])
    return json.loads(out.stdout)


def build(catalog: Path, site: Path) -> dict[str, float]:
    env = {**os.environ, "SITE_GEN_CATALOG": str(catalog), "NO_MKDOCS_2_WARNING": "1"}
    t0, c0 = time.perf_counter(), child_cpu()
    # no --quiet: it lowers the log level below warnings, and --strict then counts none
    out = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(site)],
                         capture_output=True, text=True, cwd=ROOT, env=env)
    t1, c1 = time.perf_counter(), child_cpu()
    if out.returncode:
        sys.exit(out.stderr[-2000:])
    size = sum(f.stat().st_size for f in site.rglob("*") if f.is_file()) / 1e6
    return {"build": t1 - t0, "build_cpu": c1 - c0, "site_mb": size}


def measure(label: str, catalog: Path, repeats: int, tmp: Path) -> dict[str, float | str]:
    gens = [generate(catalog) for _ in range(repeats)]
    builds = [build(catalog, tmp / f"site-{label}") for _ in range(repeats)]
    med = {k: statistics.median(g[k] for g in gens) for k in gens[0]}
    med |= {k: statistics.median(b[k] for b in builds) for k in builds[0]}
    return {"label": label, **med}


def table(rows: list[dict], repeats: int) -> str:
    lines = ["| catalogue | papers | generation: hook total (load + check + render) | of which rendering | "
             "`mkdocs build --strict` | hook / build | rendering / build | site size |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(
            f"| {r['label']} | {int(r['papers'])} | {r['total']:.2f} s ({r['total_cpu']:.2f} s CPU) | "
            f"{r['render']:.2f} s ({r['render_cpu']:.2f} s CPU) | {r['build']:.2f} s ({r['build_cpu']:.2f} s CPU) | "
            f"{100 * r['total'] / r['build']:.0f} % ({100 * r['total_cpu'] / r['build_cpu']:.0f} % CPU) | "
            f"{100 * r['render'] / r['build']:.0f} % ({100 * r['render_cpu'] / r['build_cpu']:.0f} % CPU) | "
            f"{r['site_mb']:.1f} MB |")
    lines.append(f"\nMedians of {repeats} runs, each in a fresh process; wall time with CPU time in brackets.")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="*", default=[10000], help="synthetic catalogue sizes")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        rows.append(measure("real (catalog/)", ROOT / "catalog", args.repeats, tmp))
        print(f"measured real catalogue: {rows[-1]}", file=sys.stderr)
        for n in args.sizes:
            catalog = synthetic_catalogue(tmp / f"syn-{n}", n)
            rows.append(measure(f"synthetic {n:,}", catalog, args.repeats, tmp))
            print(f"measured synthetic {n}: {rows[-1]}", file=sys.stderr)
    print(table(rows, args.repeats))


if __name__ == "__main__":
    main()
