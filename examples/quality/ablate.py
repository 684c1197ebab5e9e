"""The paper's ablations (Tables 3-6) in miniature on the text model: each row is one `text_study.py student` run
at the same token budget within its table, written as `ablation_t<N>_<row>.json` next to the main runs.

    python examples/quality/ablate.py --table 3 --raw docs/results/quality/raw -- --work /tmp/study \\
        --eval-tokens 4096 --window 512 student --steps 30,30,20 --batch 8 --micro-batch 8 --seq-len 256

Everything after `--` is passed to text_study.py (its global options, then `student` and the stage settings;
`--steps` sets the budget). Table 3 (stages) and 4 (initialisation) are on mmMamba-linear, as in the paper; their
rows split the same total steps evenly over the stages they run. Tables 5 (number of attention layers) and 6
(placement) share the stages 1-2 of the main hybrid run (`--stages12-from hybrid`: placement acts in stage 3
only), so their rows differ in stage 3 alone. Rows the main runs already are (Table 3 S1+S2+S3 and Table 4 mimic
= `text_linear`; Table 5 0 and 8 layers = `text_linear` / `text_hybrid`) are not rerun but linked. A row whose
JSON exists is skipped, so an interrupted table resumes.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # text_study's parser and budget (a script folder, not a package)
STAGE_ROWS = ["none", "S1", "S2", "S3", "S1+S2", "S1+S3", "S2+S3"]  # S1+S2+S3 is the main linear run
INIT_ROWS = ["scratch", "inherit"]  # mimic is the main linear run
COUNT_ROWS = [1, 2, 4]  # 0 = linear, 8 = every:4 = the main hybrid run, all = the teacher


def placement_rows(layers: int) -> dict[str, str]:
    """Table 6's strategies with as many attention layers as every:4 keeps (8 of SmolLM2's 30; head-interleaved
    is the main hybrid run)."""
    n = -(-layers // 4)
    return {"tail-stacked": f"tail-stacked:{n}", "head-stacked": f"head-stacked:{n}",
            "tail-interleaved": "tail-interleaved:4", "auto": f"auto:{n}"}


def spread(n: int, layers: int) -> str:
    """n attention layers spread evenly from the first (the paper leaves the 1/2/4-layer indices unstated)."""
    return ",".join(str(round(i * layers / n)) for i in range(n))


def split_steps(total: list[int], stages: str) -> str:
    """The main run's total steps spread evenly over `stages` (e.g. S1+S3), as "s1,s2,s3"."""
    run = [] if stages == "none" else [int(s[1:]) for s in stages.split("+")]
    each = sum(total) // max(1, len(run))
    return ",".join(str(each if k in run else 0) for k in (1, 2, 3))


def rows(table: int, steps: list[int], layers: int) -> dict[str, list[str]]:
    """{row name: the `student` arguments that make it}."""
    if table == 3:
        return {s: ["--placement", "none", "--stages", s, "--steps", split_steps(steps, s)] for s in STAGE_ROWS}
    if table == 4:
        return {i: ["--placement", "none", "--init", i] for i in INIT_ROWS}
    if table == 5:
        return {str(n): ["--placement", spread(n, layers), "--stages12-from", "hybrid"] for n in COUNT_ROWS}
    if table == 6:
        return {k: ["--placement", v, "--stages12-from", "hybrid"] for k, v in placement_rows(layers).items()}
    raise SystemExit(f"--table {table}: one of 3, 4, 5, 6")


def resolve_steps(top: list[str], student: list[str]) -> tuple[list[str], list[int]]:
    """The main runs' steps per stage, as text_study.py would choose them (`--steps`, or `--budget-from` a warm-up
    JSON), fixed once for every row: the student arguments with `--budget-from` replaced by explicit `--steps`."""
    from text_study import budget_steps, build_parser

    a = build_parser().parse_args([*top, "--out", "-", "student", "--name", "-", *student])
    if a.budget_from:
        a.steps = budget_steps(a.budget_from, a.stage_seconds, a.batch * a.seq_len)
        i = student.index("--budget-from")
        student = student[:i] + student[i + 2:] + ["--steps", a.steps]
    return student, [int(x) for x in a.steps.split(",")]


def split_passthrough(args: list[str]) -> tuple[list[str], list[str]]:
    """text_study.py's global options and the `student` options, from the arguments after `--`."""
    if "student" not in args:
        raise SystemExit("after `--`, give text_study.py's options, then `student` and its stage settings")
    i = args.index("student")
    return args[:i], args[i + 1:]


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    passthrough = argv[argv.index("--") + 1:] if "--" in argv else []
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--table", type=int, action="append", required=True, help="3, 4, 5 or 6 (repeatable)")
    p.add_argument("--raw", default="docs/results/quality/raw", help="where the JSONs go")
    p.add_argument("--layers", type=int, default=30, help="the teacher's layer count (SmolLM2-135M: 30)")
    p.add_argument("--only", help="comma list of row names to run")
    p.add_argument("--time-limit", type=float, help="seconds: start no row after this (a GPU call's limit)")
    args = p.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    top, student = split_passthrough(passthrough)
    student, steps = resolve_steps(top, student)
    raw = Path(args.raw)
    raw.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    for table in args.table:
        for name, extra in rows(table, steps, args.layers).items():
            if args.only and name not in args.only.split(","):
                continue
            out = raw / f"ablation_t{table}_{name}.json"
            if out.exists():
                print(f"[ablate] {out} exists: skipped", flush=True)
                continue
            if args.time_limit is not None and time.time() - t0 > args.time_limit:
                print(f"[ablate] time limit ({args.time_limit:.0f} s) reached: table {table} row {name} not run",
                      flush=True)
                continue
            # the row's own --steps / --placement come last and win over the pass-through ones
            cmd = [sys.executable, str(HERE / "text_study.py"), *top, "--out", str(out), "student",
                   "--name", f"t{table}-{name}", *student, *extra]
            print(f"[ablate] table {table} row {name}: {' '.join(cmd[1:])}", flush=True)
            subprocess.run(cmd, check=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
