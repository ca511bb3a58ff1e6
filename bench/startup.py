"""Start-up of the command line and the sweep side: `harmsweep --help` and the imports Hydra does on every start.

    python bench/startup.py [--reps 5] [--against DIR]

``--against DIR`` times another checkout of harmsweep the same way (its folder goes first on PYTHONPATH), runs
alternating with this one, and prints the ratio. Also lists which heavy packages each entry point imports: the
command line and the launcher plugin must import neither torch nor transformers. Writes outputs/bench/startup.json.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import common

ENTRY = {
    "harmsweep --help": ["-m", "harmsweep.cli", "--help"],
    "import the launcher plugin": ["-c", "import hydra_plugins.harmsweep_launcher.harmsweep_launcher"],
}
HEAVY = ("torch", "transformers", "datasets")


def _env(tree: Path | None) -> dict[str, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if tree is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(tree), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def seconds(args: list[str], tree: Path | None) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, *args], env=_env(tree), cwd=tree or common.ROOT, capture_output=True, check=True)
    return time.perf_counter() - start


def heavy(module: str, tree: Path | None) -> list[str]:
    code = f"import sys, {module}; print(','.join(m for m in {HEAVY!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], env=_env(tree), cwd=tree or common.ROOT, capture_output=True,
                         text=True, check=True)  # fmt: skip
    return [m for m in out.stdout.strip().split(",") if m]


def main() -> None:
    p = common.parser(__doc__, "startup", reps=5)
    p.add_argument("--against", type=Path, default=None, help="another checkout to time the same way")
    args = p.parse_args()
    trees = {"this": None, **({"against": args.against.resolve()} if args.against else {})}
    times: dict[str, dict[str, list[float]]] = {name: {t: [] for t in trees} for name in ENTRY}
    for _ in range(args.reps):
        for name, argv in ENTRY.items():
            for label, tree in trees.items():  # alternated, so load on the machine hits both alike
                times[name][label].append(seconds(argv, tree))
    rows, record = [], {"machine": common.machine(), "reps": args.reps, "results": {}}
    for name in ENTRY:
        this = common.spread(times[name]["this"])
        row = [name, this["median"]]
        entry = {"this": this}
        if args.against:
            other = common.spread(times[name]["against"])
            row += [other["median"], other["median"] / this["median"]]
            entry["against"] = other
        rows.append(row)
        record["results"][name] = entry
    imports = {m: heavy(m, None) for m in ("harmsweep.cli", "hydra_plugins.harmsweep_launcher.harmsweep_launcher")}
    record["heavy_imports"] = imports
    headers = ["entry point", "this (s)"] + (["against (s)", "against / this"] if args.against else [])
    print(common.table(headers, rows))
    for module, found in imports.items():
        print(f"{module} imports: {', '.join(found) or 'none of ' + ', '.join(HEAVY)}")
    common.write(args.out, record)


if __name__ == "__main__":
    main()
