"""Zoo sweep: trace, coverage and pruned == masked on every torchvision model and one model per timm family.

Each model runs in its own process (``bench/zoo_check.py``) with a time limit and an address-space
cap, at the smallest input it accepts (1x3x64x64 where it can, video 1x3x4x32x32; see
``bench/zoo_models.py``). Per model: front end (fx/export), traced or the error, prunable groups,
the share of parameters in prunable groups (``surgery.coverage``) and the top blocker, pruned vs
masked (``group-l1``, ratio 0.5, cross-channel groups skipped), the result class (the model's own
class, or a ``GraphModule`` with the reason the library gave) and the seconds taken. Results go to
``bench/results/zoo-<zoo>.json`` (``-partial`` for partial runs), then a summary: counts of exact /
untraceable / nothing prunable / mismatch / crash, how many reach a share >= 0.9, the models below
with their blocking op, "own class N / GraphModule M" and each GraphModule result with its reason. ``pip install -e '.[bench]'`` brings timm (never with weights).

    python bench/zoo_sweep.py --torchvision           # classification + segmentation + video
    python bench/zoo_sweep.py --timm                  # the smallest model of every timm family
    python bench/zoo_sweep.py --timm --families resnet,vgg --limit 5
    python bench/zoo_sweep.py --quick                 # a few models of each zoo (CI-sized)
    python bench/zoo_sweep.py --torchvision resnet50 vit_b_16
    python bench/zoo_sweep.py --at HEAD --timm        # surgery/ as committed, while others edit the tree
    python bench/zoo_sweep.py --readme                # write the stored results' summary into README.md
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
SHARE = 0.9
STATUSES = ("exact", "untraceable", "nothing prunable", "mismatch", "crash", "timeout", "out of memory", "no input")


def _limit(mem_bytes: int):
    def set_limits():
        resource.setrlimit(resource.RLIMIT_AS, (mem_bytes, mem_bytes))
    return set_limits


def normalized(row: dict) -> dict:
    """Rows stored before zoo_check knew allocation failures: those are "out of memory" too."""
    err = row.get("error") or ""
    if row["status"] in ("crash", "untraceable") and ("can't allocate memory" in err or "MemoryError" in err):
        row = {**row, "status": "out of memory"}
    return row


HARNESS = ("bench/zoo_check.py", "bench/zoo_models.py")


def snapshot(rev: str) -> tuple[Path, str | None]:
    """A folder with the per-model harness (``bench/zoo_check.py``, ``bench/zoo_models.py``) and, for a
    commit ``rev``, ``surgery/`` as of that commit (the harness then comes from it too), and the
    commit's hash. A long sweep on a working tree that others edit then runs one version of the code
    throughout; without ``rev`` the harness is copied as it is now and ``surgery`` is the installed one."""
    where = Path(tempfile.mkdtemp(prefix="zoo-sweep-"))
    if not rev:
        (where / "bench").mkdir()
        for f in HARNESS:
            shutil.copy(ROOT / f, where / f)
        return where, None
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--verify", f"{rev}^{{commit}}"], check=True,
                            capture_output=True, text=True).stdout.strip()
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", commit, "surgery", *HARNESS], check=True,
                             capture_output=True)
    subprocess.run(["tar", "-x", "-C", str(where)], input=archive.stdout, check=True)
    return where, commit


def source_note(commit: str | None) -> str:
    if commit:
        return f"surgery at commit {commit[:10]}"
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short=10", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--", "surgery"], capture_output=True, text=True).stdout
    return f"surgery working tree at {head}{' with uncommitted changes' if dirty.strip() else ''}"


def run_one(spec: dict, timeout: float, mem_gb: float, source: Path | None = None, at_commit: bool = False) -> dict:
    """Check one model in a child process; a timeout or a dead child becomes a row too. ``source``
    holds the harness (and ``surgery/`` when ``at_commit``), see ``snapshot``."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    if at_commit:
        env["PYTHONPATH"] = os.pathsep.join([str(source), *filter(None, [env.get("PYTHONPATH")])])
    script = (source or ROOT) / "bench" / "zoo_check.py"
    t0 = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, str(script), json.dumps(spec)], capture_output=True,
                              text=True, timeout=timeout, env=env, preexec_fn=_limit(int(mem_gb * 2**30)))
    except subprocess.TimeoutExpired:
        return {**spec, "status": "timeout", "error": f"over {timeout:.0f} s", "seconds": round(time.perf_counter() - t0, 1)}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("RESULT:"):
            return json.loads(line[len("RESULT:"):])
    tail = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()][-1:] or [f"exit code {proc.returncode}"]
    oom = "MemoryError" in proc.stderr or "out of memory" in proc.stderr or "std::bad_alloc" in proc.stderr
    return {**spec, "status": "out of memory" if oom else "crash", "stage": "process", "error": tail[0][:300],
            "seconds": round(time.perf_counter() - t0, 1)}


# ---------------------------------------------------------------------------------------------- reporting

def _label(row: dict) -> str:
    return f"{row['family']} ({row['name']})" if row.get("family") else row["name"]


def _blocker(row: dict) -> str:
    b = row.get("blockers") or []
    return f"{b[0]['reason']} ({b[0]['op']})" if b else ""


def table_line(row: dict) -> str:
    share = f"{row['share']:.2f}" if "share" in row else ""
    rel = f"{row['rel_err']:.1e}" if "rel_err" in row else ""
    traced = "yes" if row.get("traced") else (row.get("error") or row.get("trace_error") or "no")[:120].replace("|", "/")
    status = row["status"] + (f": {row['error'][:120]}" if row["status"] in ("mismatch", "crash", "timeout", "out of memory")
                              and row.get("error") else "")
    return (f"| {_label(row)} | {row.get('frontend', '')} | {traced} | {row.get('prunable_groups', '')} | {share} "
            f"| {_blocker(row)} | {rel} | {row.get('output', '')} | {status.replace('|', '/')} | {row.get('seconds', '')} |")


HEADER = ("| model | front end | traced | prunable groups | share prunable | top blocker (reason, op) "
          "| pruned vs masked | result class | status | s |\n|---|---|---|---|---|---|---|---|---|---|")


def own_class(row: dict) -> bool | None:
    """Whether the pruned model is the model's own class (None: no pruned model, or not recorded)."""
    if "own_class" in row:
        return row["own_class"]
    return None if not row.get("output") else row["output"] != "GraphModule"


def result_class_text(rows: list[dict]) -> list[str]:
    """"own class N / GraphModule M (reasons)" and the GraphModule models with their reason."""
    made = [r for r in rows if own_class(r) is not None]
    graph = [r for r in made if not own_class(r)]
    if not made:
        return []
    reasons: dict[str, int] = {}
    for r in graph:
        why = _reason_kind(r.get("output_reason"))
        reasons[why] = reasons.get(why, 0) + 1
    why = "; ".join(f"{n} {k}" for k, n in sorted(reasons.items(), key=lambda kv: -kv[1]))
    out = [f"Result class of the {len(made)} pruned models: own class {len(made) - len(graph)} / "
           f"GraphModule {len(graph)}{f' ({why})' if why else ''}."]
    if graph:
        out += ["", "| GraphModule result | front end | reason |", "|---|---|---|"]
        for r in sorted(graph, key=_label):
            text = (r.get("output_reason") or "reason not recorded (stored before the harness kept it)")
            out.append(f"| {_label(r)} | {r.get('frontend', '')} | {text[:200].replace('|', '/')} |")
    return out


def _reason_kind(reason: str | None) -> str:
    """A short class of a GraphModule reason, for the count."""
    if not reason:
        return "reason not recorded"
    for key, kind in (("fails on the pruned widths", "own forward fails on the new widths"),
                      ("differs from the pruned graph", "own forward computes something else (a width held outside modules)"),
                      ("gives shape", "own forward gives another shape"),
                      ("cannot set the widths", "a width attribute cannot be set"),
                      ("not available", "the model is not available"),
                      ("different number of tensors", "own forward returns other outputs")):
        if key in reason:
            return kind
    return reason.split(":")[0][:60]


def summarize(rows: list[dict]) -> dict:
    counts = {s: sum(r["status"] == s for r in rows) for s in STATUSES}
    high = [r for r in rows if r.get("share", 0) >= SHARE]
    low = [r for r in rows if r["status"] not in ("no input",) and r.get("share", 0) < SHARE]
    return {"models": len(rows), "counts": counts, "share_ge_0.9": len(high), "below": low}


def summary_text(title: str, rows: list[dict], wall: float | None) -> str:
    s = summarize(rows)
    counts = ", ".join(f"{v} {k}" for k, v in s["counts"].items() if v)
    n = s["models"]
    pct = 100 * s["share_ge_0.9"] / n if n else 0
    fronts = {f: sum(r.get("frontend") == f for r in rows) for f in ("fx", "export")}
    traced = ", ".join(f"{v} {k}" for k, v in fronts.items() if v)
    out = [f"**{title}**: {n} models{f' in {wall / 60:.0f} min' if wall else ''}: {counts}; "
           f"share of parameters prunable >= 0.9 in {s['share_ge_0.9']} ({pct:.0f}%); traced by {traced or 'none'}."]
    classes = result_class_text(rows)
    if classes:
        out += [""] + classes
    if s["below"]:
        out += ["", "| below 0.9 | share | status | top blocker (reason, op) |", "|---|---|---|---|"]
        for r in sorted(s["below"], key=lambda r: r.get("share", -1)):
            share = f"{r['share']:.2f}" if "share" in r else "-"
            short = {"out of memory": "an allocation failed under the memory cap", "timeout": r.get("error", "")}
            why = _blocker(r) or short.get(r["status"]) or (r.get("error") or "")[:100].replace("|", "/")
            out.append(f"| {_label(r)} | {share} | {r['status']} | {why} |")
    return "\n".join(out)


def readme_text() -> str:
    parts = []
    for zoo, title in (("timm", "timm, smallest model of each family"), ("torchvision", "torchvision")):
        path, subset = RESULTS / f"zoo-{zoo}.json", ""
        if not path.exists() and (RESULTS / f"zoo-{zoo}-partial.json").exists():
            path, subset = RESULTS / f"zoo-{zoo}-partial.json", " (subset)"
        if not path.exists():
            continue
        data = json.loads(path.read_text())
        rows = [normalized(r) for r in data["rows"]]
        if subset:
            parts.append(f"_{title}: a subset of {len(rows)} models was run (the full sweep did not fit the time "
                         f"available): {', '.join(r['name'] for r in rows)}._")
        if data.get("rerun"):
            parts.append(f"_{title}: {data['rerun']}._")
        if data.get("not_run"):
            parts.append(f"_{title}: {len(data['not_run'])} not run in the time available: "
                         f"{', '.join(data['not_run'])}._")
        if zoo == "torchvision":
            for kind in ("classification", "segmentation", "video"):
                sub = [r for r in rows if r.get("kind") == kind]
                if sub:
                    parts.append(summary_text(f"torchvision {kind}{subset}", sub, None))
            parts[-1] += f"\n\ntorchvision total: {len(rows)} models in {data['wall_seconds'] / 60:.0f} min."
        else:
            parts.append(summary_text(title + subset, rows, data.get("wall_seconds")))
        env = data.get("versions", {})
        parts.append(f"<sub>{data.get('source', '')}; {', '.join(f'{k} {v}' for k, v in env.items())}; "
                     f"{data.get('timeout', '')} s and {data.get('mem_gb', '')} GB per model; "
                     f"input {data.get('input_note', '')}</sub>")
    if not parts:
        raise SystemExit(f"no stored results in {RESULTS}; run --timm / --torchvision first")
    return "\n\n".join(parts)


def merge_partial(zoo: str, specs: list[dict]) -> Path:
    """Add the rows of ``zoo-<zoo>-partial.json`` to ``zoo-<zoo>.json`` for models the full file lacks
    (two sweeps of one commit run side by side, e.g. families a-m and n-z), and record the models of
    ``specs`` neither has as ``not_run``. Refuses results of different commits."""
    full, part = RESULTS / f"zoo-{zoo}.json", RESULTS / f"zoo-{zoo}-partial.json"
    a, b = json.loads(full.read_text()), json.loads(part.read_text())
    if a.get("source") != b.get("source"):
        raise SystemExit(f"cannot merge results of {a.get('source')!r} and {b.get('source')!r}")
    have = {r["name"] for r in a["rows"]}
    rows = a["rows"] + [r for r in b["rows"] if r["name"] not in have]
    order = {s["name"]: i for i, s in enumerate(specs)}
    rows.sort(key=lambda r: order.get(r["name"], len(order)))
    done = {r["name"] for r in rows}
    not_run = [(f"{s['family']} ({s['name']})" if s.get("family") else s["name"]) for s in specs if s["name"] not in done]
    a.update(rows=rows, not_run=not_run, wall_seconds=max(a.get("wall_seconds", 0), b.get("wall_seconds", 0)),
             source=f"{a.get('source', '')}, in {1 + bool(b['rows'])} processes side by side")
    full.write_text(json.dumps(a, indent=1, default=str))
    return full


# ---------------------------------------------------------------------------------------------- main

def _versions() -> dict:
    import torch
    import torchvision

    out = {"torch": torch.__version__, "torchvision": torchvision.__version__}
    try:
        import timm
        out["timm"] = timm.__version__
    except ImportError:
        pass
    return out


def sweep(zoo: str, specs: list[dict], out: Path, timeout: float, mem_gb: float, resume: bool,
          source: Path | None = None, note: str = "", at_commit: bool = False) -> list[dict]:
    done = {}
    if resume and out.exists():
        done = {r["name"]: r for r in json.loads(out.read_text())["rows"]}
    rows: list[dict] = []
    t0 = time.perf_counter()
    prior = json.loads(out.read_text()).get("wall_seconds", 0) if resume and out.exists() else 0
    print(f"## {zoo}: {len(specs)} models ({note})\n\n{HEADER}", flush=True)
    for i, spec in enumerate(specs, 1):
        row = normalized(done.get(spec["name"]) or run_one(spec, timeout, mem_gb, source, at_commit))
        rows.append(row)
        print(table_line(row), flush=True)
        print(f"[{i}/{len(specs)}] {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"zoo": zoo, "versions": _versions(), "source": note, "timeout": timeout,
                                   "mem_gb": mem_gb, "wall_seconds": prior + time.perf_counter() - t0,
                                   "input_note": "1x3x64x64 where the model runs on it, video 1x3x4x32x32, else the "
                                                 "smallest tried or the native size", "rows": rows},
                                  indent=1, default=str))
    wall = prior + time.perf_counter() - t0
    if zoo == "torchvision":
        for kind in ("classification", "segmentation", "video"):
            sub = [r for r in rows if r.get("kind") == kind]
            if sub:
                print("\n" + summary_text(f"torchvision {kind}", sub, None))
    print("\n" + summary_text(zoo, rows, wall) + f"\n\nresults: {out}", flush=True)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="*", help="torchvision model names (or timm names with --timm)")
    ap.add_argument("--timm", action="store_true", help="the smallest model of every timm family (model module)")
    ap.add_argument("--torchvision", action="store_true", help="torchvision classification, segmentation and video")
    ap.add_argument("--families", default="", help="comma-separated timm families (modules) or torchvision kinds")
    ap.add_argument("--limit", type=int, default=0, help="only the first N models")
    ap.add_argument("--quick", action="store_true", help="a few models of each zoo (CI-sized)")
    ap.add_argument("--timeout", type=float, default=180, help="seconds per model (default 180)")
    ap.add_argument("--mem-gb", type=float, default=8, help="address-space cap per model process (default 8)")
    ap.add_argument("--resume", action="store_true", help="keep the rows already in the results file")
    ap.add_argument("--at", default="", metavar="REV",
                    help="sweep surgery/ (and the harness) as of this commit, e.g. HEAD, not the working tree")
    ap.add_argument("--readme", action="store_true", help="write the stored full results' summary into README.md")
    ap.add_argument("--merge", action="store_true",
                    help="add the partial results' rows (same commit) to the full results of --timm/--torchvision")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(HERE))
    zoos = [z for z, on in (("timm", args.timm or args.quick), ("torchvision", args.torchvision or args.quick)) if on]
    if not zoos and (args.models or not args.readme):
        zoos = ["torchvision"]
    families = [f for f in args.families.split(",") if f]
    if args.merge:
        import zoo_models

        for zoo in zoos if (args.timm or args.torchvision) else []:
            specs = (zoo_models.timm_family_specs(cache=RESULTS / "timm-params.json") if zoo == "timm"
                     else zoo_models.torchvision_specs())
            print(f"merged into {merge_partial(zoo, specs)}", file=sys.stderr)
        zoos = []
    failed = 0
    source, commit = snapshot(args.at) if zoos else (None, None)
    note = source_note(commit) if zoos else ""
    try:
        for zoo in zoos:
            failed += _sweep_zoo(zoo, args, families, source, note)
    finally:
        if source is not None:
            shutil.rmtree(source, ignore_errors=True)
    if args.readme:
        from readme_section import replace_section

        replace_section("zoo-sweep", readme_text())
        print("README.md: zoo-sweep section written", file=sys.stderr)
    return 1 if failed else 0


def _sweep_zoo(zoo: str, args, families: list[str], source: Path | None, note: str) -> int:
    """Run one zoo's sweep; the number of models that crashed or broke an invariant."""
    import zoo_models

    if zoo == "timm" and args.models:
        specs = [{"zoo": "timm", "family": "", "name": n} for n in args.models]
    elif zoo == "timm":
        specs = zoo_models.timm_family_specs(families or (zoo_models.QUICK_TIMM if args.quick else None),
                                             cache=RESULTS / "timm-params.json")
    else:
        kinds = ("classification", "segmentation", "video")
        if set(families) - set(kinds):
            raise SystemExit(f"torchvision kinds are {', '.join(kinds)}; got {', '.join(families)}")
        specs = zoo_models.torchvision_specs(tuple(families) or kinds)
        if args.models or args.quick:
            wanted = args.models or zoo_models.QUICK_TORCHVISION
            specs = [s for s in zoo_models.torchvision_specs() if s["name"] in wanted]
    if args.limit:
        specs = specs[: args.limit]
    partial = bool(args.models or families or args.limit or args.quick)
    out = RESULTS / f"zoo-{zoo}{'-partial' if partial else ''}.json"
    rows = sweep(zoo, specs, out, args.timeout, args.mem_gb, args.resume, source, note, bool(args.at))
    return sum(r["status"] in ("mismatch", "crash") for r in rows)


if __name__ == "__main__":
    sys.exit(main())
