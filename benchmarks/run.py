"""Run the benchmark suite and regenerate the tables in BENCHMARKS.md.

    python benchmarks/run.py                    # the suite (what `make bench` runs)
    python benchmarks/run.py --long             # the long ones (what `make bench-long` runs)
    python benchmarks/run.py route moe          # some of them, then regenerate every table
    python benchmarks/run.py --tables-only      # regenerate the tables from results/*.md
    python benchmarks/run.py --quick --out DIR  # smoke test: tiny sizes, BENCHMARKS.md untouched

Each benchmark is its own script (``benchmarks/bench_<name>.py``, runnable alone)
and runs in its own process, one after the other, so that none shares a warm
cache or a thread pool with another. Each writes ``<out>/<name>.json`` (raw
figures, command, machine) and ``<out>/<name>.md`` (its tables). BENCHMARKS.md
holds each table between ``<!-- results/<name>.md -->`` and
``<!-- /results/<name>.md -->``; everything outside those markers is prose and
is left alone. The suite's own wall time goes to ``results/suite.md``.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

from _common import RESULTS, machine, machine_line, table

HERE = Path(__file__).resolve().parent
DOC = HERE.parent / "BENCHMARKS.md"
# Cheap and timing-sensitive first, long trainings last; together about an hour on 2 cores
# (decode alone takes about 11 minutes).
BENCHMARKS = ["sharing", "route", "lean", "depth", "moe", "per_sample", "decode", "train", "fsdp",
              "demo", "early_exit", "adaptive", "autoencoder", "ponder", "mnist1d", "transfer"]
# Each of these trains for ten minutes or more (ResNets, decoders, several seeds to
# convergence), or times a 135M-parameter model (hf) or MoE peers up to 8,192 tokens
# (moe_peers): `make bench-long`. The converged ones keep their runs in runs/bench/ and
# resume when run again.
LONG = ["lm_tying", "albert", "sdn", "tokens", "earlyon", "transfer_resnet", "hf", "moe_peers"]


def regenerate(doc: Path, results: Path) -> list[str]:
    """Replace every marked block of ``doc`` with ``results/<name>.md``; return the names.

    Raises:
        SystemExit: a marker names a results file that does not exist, or a
            block is not closed (nothing is written then).
    """
    text = doc.read_text(encoding="utf-8")
    block = re.compile(r"(<!-- results/(?P<name>[\w.-]+\.md) -->\n)(?P<body>.*?)"
                       r"(<!-- /results/(?P=name) -->)", re.S)
    opened = re.findall(r"<!-- results/([\w.-]+\.md) -->", text)
    found = [m["name"] for m in block.finditer(text)]
    if unclosed := [n for n in opened if n not in found]:
        raise SystemExit(f"{doc}: no closing <!-- /results/{unclosed[0]} --> for its block.")
    if missing := [n for n in found if not (results / n).is_file()]:
        raise SystemExit(f"{doc} shows {missing}, which {results} does not hold; run "
                         f"`python benchmarks/run.py {Path(missing[0]).stem}` first.")

    def fill(m: re.Match) -> str:
        return m[1] + (results / m["name"]).read_text(encoding="utf-8").rstrip("\n") + "\n" + m[4]

    doc.write_text(block.sub(fill, text), encoding="utf-8")
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", metavar="NAME",
                        help=f"benchmarks to run (default: the suite): "
                        f"{', '.join(BENCHMARKS + LONG)}")
    parser.add_argument("--long", action="store_true", help=f"run {', '.join(LONG)}")
    parser.add_argument("--quick", action="store_true", help="tiny sizes; tables untouched")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results directory")
    parser.add_argument("--tables-only", action="store_true",
                        help="run nothing; regenerate BENCHMARKS.md from the results files")
    args = parser.parse_args()
    if unknown := [n for n in args.names if n not in BENCHMARKS + LONG]:
        parser.error(f"unknown benchmark {unknown[0]!r}; choose from "
                     f"{', '.join(BENCHMARKS + LONG)}")
    names = [] if args.tables_only else args.names or (LONG if args.long else BENCHMARKS)
    seconds, failed = {}, []
    for name in names:
        print(f"== {name}", flush=True)
        start = time.perf_counter()
        cmd = [sys.executable, str(HERE / f"bench_{name}.py"), "--out", str(args.out)]
        if subprocess.run(cmd + (["--quick"] if args.quick else [])).returncode:
            failed.append(name)
        seconds[name] = time.perf_counter() - start
    if names == BENCHMARKS and not args.quick and not failed:
        write_suite(args.out, seconds)
    if failed:
        raise SystemExit(f"failed: {', '.join(failed)}; BENCHMARKS.md was not regenerated "
                         "(after fixing them, rerun them, or `--tables-only` to publish the rest)")
    if not args.quick and args.out == RESULTS:
        print("regenerated:", ", ".join(regenerate(DOC, RESULTS)))


def write_suite(out: Path, seconds: dict[str, float]) -> None:
    """``suite.json``/``suite.md``: the wall time of each benchmark in a full run."""
    m = machine()
    total = sum(seconds.values())
    rows = [[f"`bench_{k}.py`", f"{v / 60:.1f}"] for k, v in seconds.items()]
    rows.append(["all", f"{total / 60:.1f}"])
    (out / "suite.json").write_text(json.dumps(
        {"command": "python benchmarks/run.py", "machine": m, "date": time.strftime("%Y-%m-%d"),
         "seconds": seconds, "total_seconds": total}, indent=2) + "\n")
    (out / "suite.md").write_text(
        f"Command: `python benchmarks/run.py` (`make bench`, {time.strftime('%Y-%m-%d')}). "
        f"{machine_line(m)}\n\n" + "\n".join(table(["benchmark", "minutes"], rows)) + "\n")


if __name__ == "__main__":
    main()
