"""The ``surgery`` command line, run through the real executable (``python -m surgery.cli``).

Each process pays for importing torch, so independent invocations run concurrently: one fixture
starts every bad-input case at once and the parametrized test checks each result. Every bad input
must give a non-zero exit, exactly one non-empty stderr line (no traceback), no output file, and
leave its input byte-identical.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import tempfile
import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

SURGERY = [sys.executable, "-m", "surgery.cli"]
SHAPE = ["--input-shape", "1,3,64,64"]


def run_cli(args: list[str], cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(cwd), "COLUMNS": "200"}
    return subprocess.run([*SURGERY, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def run_many(jobs: dict[str, tuple[list[str], Path]]) -> dict[str, subprocess.CompletedProcess]:
    with ThreadPoolExecutor(max_workers=max(2, min(8, (os.cpu_count() or 2) * 2))) as pool:
        futures = {name: pool.submit(run_cli, args, cwd) for name, (args, cwd) in jobs.items()}
        return {name: f.result() for name, f in futures.items()}


def digest(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else None


def stderr_lines(r: subprocess.CompletedProcess) -> list[str]:
    return [ln for ln in r.stderr.splitlines() if ln.strip()]


# -- inputs --------------------------------------------------------------------------------------
FOREIGN_MODULE = """
import torch
class Foreign(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(4, 4)
    def forward(self, x):
        return self.fc(x)
"""

EVIL_MODULE = """
import os
class Evil:
    def __init__(self, target):
        self.target = target
    def __reduce__(self):
        return (os.system, ("touch " + self.target,))
"""

UNTRACEABLE_MODULE = """
import torch
class Branchy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3)
    def forward(self, x):
        if x.sum() > 0:
            return self.conv(x)
        return self.conv(-x)
def make():
    return Branchy()
"""


def _read_only_dir(base: Path) -> Path | None:
    """A directory this process cannot create files in (root ignores modes: fall back to /sys)."""
    d = base / "readonly"
    d.mkdir()
    d.chmod(0o555)
    for cand in (d, Path("/sys")):
        try:
            fd, tmp = tempfile.mkstemp(dir=cand)
        except OSError:
            return cand
        os.close(fd)
        os.unlink(tmp)
    return None


def _write_module(folder: Path, name: str, source: str) -> None:
    (folder / f"{name}.py").write_text(textwrap.dedent(source))


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """A folder with every input file the cases need (made in this process, through the API)."""
    import surgery
    from surgery import checkpoint

    d = tmp_path_factory.mktemp("cli")
    (d / "empty.pt").write_bytes(b"")
    (d / "text.pt").write_text("this is a text file, not a model\n")
    (d / "text.npz").write_text("not an npz archive\n")
    for name, src in (("cli_foreign_mod", FOREIGN_MODULE), ("cli_evil_mod", EVIL_MODULE), ("cli_branchy", UNTRACEABLE_MODULE)):
        _write_module(d, name, src)
    sys.path.insert(0, str(d))
    try:
        import cli_evil_mod
        import cli_foreign_mod

        torch.save(cli_foreign_mod.Foreign(), d / "foreign.pt")
        torch.save(cli_evil_mod.Evil(str(d / "PWNED_zip")), d / "evil.pt")
        with open(d / "evil_raw.pt", "wb") as f:
            import pickle

            pickle.dump(cli_evil_mod.Evil(str(d / "PWNED_raw")), f)
    finally:
        sys.path.remove(str(d))
        sys.modules.pop("cli_foreign_mod", None)
        sys.modules.pop("cli_evil_mod", None)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 3))
    torch.save(net, d / "small.pt")
    small = surgery.prune(net.eval(), torch.randn(1, 3, 16, 16), "l1", 0.5)
    checkpoint.save(small, d / "ckpt.pt")
    data = (d / "ckpt.pt").read_bytes()
    (d / "trunc.pt").write_bytes(data[: len(data) // 2])
    return d


# -- bad inputs ----------------------------------------------------------------------------------
# name -> (args (OUT is replaced by an output path), input file or None, regex the error line must match)
BAD = {
    "missing_file": (["prune", "missing.pt", "--out", "OUT"], None, r"missing\.pt: no such file"),
    "empty_file": (["prune", "empty.pt", "--out", "OUT"], "empty.pt", r"empty\.pt is empty"),
    "truncated_checkpoint": (["prune", "trunc.pt", "--out", "OUT"], "trunc.pt", r"trunc\.pt.*(truncated|corrupt|not a model)"),
    "text_named_pt": (["prune", "text.pt", "--out", "OUT"], "text.pt", r"text\.pt is not a model file"),
    "foreign_class": (["prune", "foreign.pt", "--out", "OUT"], "foreign.pt", r"cli_foreign_mod\.Foreign.*--trust"),
    "malicious_zip": (["stats", "evil.pt"], "evil.pt", r"refusing.*--trust"),
    "malicious_raw": (["graph", "evil_raw.pt"], "evil_raw.pt", r"refusing.*--trust"),
    "unknown_prefix": (["prune", "nosuchprefix:resnet18", "--out", "OUT"], None, r"unknown model spec nosuchprefix:resnet18"),
    "unknown_method": (["prune", "torchvision:resnet18", "--method", "nope", "--out", "OUT", *SHAPE], None,
                       r"unknown method 'nope'; known methods: .*l1"),
    "ratio_negative": (["prune", "torchvision:resnet18", "--ratio=-0.1", "--out", "OUT", *SHAPE], None, r"ratio must be .*\[0, 1\).*-0\.1"),
    "ratio_one": (["prune", "torchvision:resnet18", "--ratio", "1.0", "--out", "OUT", *SHAPE], None, r"ratio must be .*\[0, 1\).*1\.0"),
    "input_shape_misfit": (["prune", "torchvision:resnet18", "--input-shape", "1,5,64,64", "--out", "OUT"], None,
                           r"(does not run|shape propagation failed).*(channels|size|shape)"),
    "out_missing_dir": (["prune", "small.pt", "--input-shape", "1,3,16,16", "--out", "no/such/dir/f.pt"], "small.pt",
                        r"does not exist"),
    "bad_kwargs": (["prune", "torchvision:resnet18", "--kwargs", "[1]", "--out", "OUT", *SHAPE], None,
                   r"--kwargs must be a JSON object"),
    "untraceable": (["prune", "cli_branchy:make", "--input-shape", "1,3,8,8", "--out", "OUT"], None,
                    r"cannot trace Branchy.*cli_branchy\.py:\d+ `if x\.sum\(\) > 0:`.*--leaf"),
    "unknown_option": (["prune", "small.pt", "--input-shape", "1,3,16,16", "--method", "random", "--option", "sed=3", "--out", "OUT"],
                       "small.pt", r"unknown option 'sed' for method 'random' \(did you mean 'seed'\?\); known options: .*seed"),
    "bad_option_value": (["prune", "small.pt", "--input-shape", "1,3,16,16", "--method", "random", "--option", "seed=x", "--out", "OUT"],
                         "small.pt", r"option 'seed' of method 'random' must be a int, got 'x'"),
    "option_without_value": (["prune", "small.pt", "--input-shape", "1,3,16,16", "--option", "seed", "--out", "OUT"],
                             "small.pt", r"--option takes NAME=VALUE"),
    "method_needs_data": (["prune", "small.pt", "--input-shape", "1,3,16,16", "--method", "thinet", "--out", "OUT"],
                          "small.pt", r"method 'thinet' needs calibration data"),
    "missing_data": (["prune", "small.pt", "--input-shape", "1,3,16,16", "--method", "apoz", "--data", "nodata.npz", "--out", "OUT"],
                     "small.pt", r"data 'nodata\.npz' not found"),
    "corrupt_data": (["prune", "small.pt", "--input-shape", "1,3,16,16", "--method", "apoz", "--data", "text.npz", "--out", "OUT"],
                     "small.pt", r"cannot read data .*text\.npz"),
    "bad_target_macs": (["prune", "small.pt", "--input-shape", "1,3,16,16", "--target-macs", "0", "--out", "OUT"],
                        "small.pt", r"target_macs is the fraction of MACs to keep"),
}


class Result:
    """What one invocation gave, whichever way it ran."""

    def __init__(self, returncode: int, stdout: str, stderr: str):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def run_inprocess(args: list[str], cwd: Path) -> Result:
    """The same ``app`` in this process (typer's CliRunner): the full matrix at a fraction of the cost."""
    from typer.testing import CliRunner

    from surgery.cli import app

    old = os.getcwd()
    os.chdir(cwd)
    sys.path.insert(0, str(cwd))
    try:
        r = CliRunner().invoke(app, args)
    finally:
        os.chdir(old)
        sys.path.remove(str(cwd))
    return Result(r.exit_code, r.stdout, r.stderr)


@pytest.fixture(scope="module")
def readonly(work) -> Path | None:
    return _read_only_dir(work)


def check_bad(name: str, work: Path, readonly: Path | None, runner) -> None:
    cases = dict(BAD)
    if readonly is not None:
        cases["out_readonly_dir"] = (["prune", "small.pt", "--input-shape", "1,3,16,16", "--out", str(readonly / "f.pt")],
                                     "small.pt", r"cannot write .*(not writable|[Pp]ermission denied|[Rr]ead-only)")
    if name not in cases:
        pytest.skip("no directory here refuses writes (root, and no read-only mount)")
    args, src, pattern = cases[name]
    out = work / f"out_{name}_{runner.__name__}.pt"
    before = digest(work / src) if src else None
    r = runner([str(out) if a == "OUT" else a for a in args], work)
    assert_one_line_failure(r, pattern)
    assert not out.exists()
    assert not list(work.glob(".*.tmp")), "a temporary file was left behind"
    if src:
        assert digest(work / src) == before, "the input file changed"


def assert_one_line_failure(r, pattern: str) -> None:
    lines = stderr_lines(r)
    assert r.returncode == 1, (r.returncode, r.stderr)
    assert len(lines) == 1, r.stderr
    assert "Traceback" not in r.stderr
    assert re.search(pattern, lines[0]), lines[0]


@pytest.mark.parametrize("name", [*BAD, "out_readonly_dir"])
def test_bad_input_executable(name, work, readonly):
    """The full bad-input matrix through the real executable (a few seconds of imports per case)."""
    check_bad(name, work, readonly, run_cli)


# -- the real executable -------------------------------------------------------------------------
EXE_BAD = ("malicious_zip", "malicious_raw")


@pytest.fixture(scope="module")
def exe_runs(work):
    """One batch of real-executable runs: bad inputs, --debug, and the prune the follow-ups need."""
    jobs = {name: ([str(work / f"out_{name}_exe.pt") if a == "OUT" else a for a in BAD[name][0]], work) for name in EXE_BAD}
    jobs["debug"] = (["stats", "empty.pt", "--debug"], work)
    jobs["prune"] = (["prune", "torchvision:resnet18", "--ratio", "0.5", *SHAPE, "--out", "r18.pt", "--plan-out", "plan.json"], work)
    jobs["graph"] = (["graph", "torchvision:resnet18", *SHAPE], work)
    jobs["methods"] = (["methods"], work)
    return run_many(jobs)


def test_malicious_pickle_never_runs(exe_runs, work):
    runs = exe_runs
    assert runs["malicious_zip"].returncode != 0 and runs["malicious_raw"].returncode != 0
    assert not (work / "PWNED_zip").exists() and not (work / "PWNED_raw").exists()
    for name in ("evil.pt", "evil_raw.pt"):  # and not in-process either
        assert run_inprocess(["stats", name], work).returncode == 1
    assert not (work / "PWNED_zip").exists() and not (work / "PWNED_raw").exists()


def test_debug_shows_traceback(exe_runs):
    r = exe_runs["debug"]
    assert r.returncode == 1 and "Traceback" in r.stderr and "ModelLoadError" in r.stderr


# -- the happy path ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pruned(exe_runs):
    r = exe_runs["prune"]
    assert r.returncode == 0, r.stderr
    return r

def test_prune_writes_checkpoint_and_plan(pruned, work):
    from surgery import checkpoint
    from surgery.plan import Plan

    assert re.search(r"params\s*│\s*11\.69 M\s*│\s*\d", pruned.stdout), pruned.stdout
    assert "layer1.0.conv1" in pruned.stdout and "written to r18.pt" in pruned.stdout
    model = checkpoint.load(work / "r18.pt")
    n = sum(p.numel() for p in model.parameters())
    assert n < 11_689_512 * 0.5
    meta = checkpoint.read_metadata(work / "r18.pt")
    assert meta["method"] == "l1" and meta["source"] == "torchvision:resnet18"
    assert meta["stats"]["after"]["params"] == n
    plan = Plan.from_json((work / "plan.json").read_text())
    assert plan.groups and all(len(g.keep) == g.size - g.size // 2 for g in plan.groups)
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 1000)


@pytest.fixture(scope="module")
def follow_ups(pruned, exe_runs, work):
    """``stats`` of the pruned file through the executable; the rest in-process (same code path)."""
    small_before = digest(work / "small.pt")
    runs = {"stats": run_cli(["stats", "r18.pt"], work), "graph": exe_runs["graph"], "methods": exe_runs["methods"]}
    runs["graph_json"] = run_inprocess(["graph", "r18.pt", "--format", "json", "--out", "g.json"], work)
    runs["replan"] = run_inprocess(["prune", "torchvision:resnet18", "--plan", "plan.json", *SHAPE, "--out", "again.pt"], work)
    runs["small"] = run_inprocess(["prune", "small.pt", "--input-shape", "1,3,16,16", "--ratio", "0.25", "--out", "small_out.pt"], work)
    return runs, small_before


def test_stats_reads_checkpoint(follow_ups):
    r = follow_ups[0]["stats"]
    assert r.returncode == 0, r.stderr
    m = re.search(r"params\s*│\s*([\d,]+)", r.stdout)
    assert m and int(m.group(1).replace(",", "")) < 11_689_512 * 0.5, r.stdout
    assert "l1 ratio 0.5 from torchvision:resnet18" in r.stdout


def test_graph_text_lists_groups(follow_ups):
    r = follow_ups[0]["graph"]
    assert r.returncode == 0, r.stderr
    assert "14 groups, 12 prunable" in r.stdout
    assert re.search(r"│\s*13\s*│\s*1000\s*│\s*no\s*│ is a dimension of a model output", r.stdout), r.stdout


def test_graph_json_of_checkpoint(follow_ups, work):
    import json

    r = follow_ups[0]["graph_json"]
    assert r.returncode == 0, r.stderr
    data = json.loads((work / "g.json").read_text())
    assert len(data["groups"]) == 14 and data["graph"]["nodes"]
    assert data["groups"][1]["size"] == 32 and data["groups"][1]["prunable"] is True


def test_methods_lists_l1(follow_ups):
    r = follow_ups[0]["methods"]
    assert r.returncode == 0, r.stderr
    assert re.search(r"^l1\s+\S", r.stdout, re.M) and "random" in r.stdout


def test_prune_with_saved_plan_reproduces_model(follow_ups, work):
    from surgery import checkpoint

    r = follow_ups[0]["replan"]
    assert r.returncode == 0, r.stderr
    a, b = checkpoint.load(work / "r18.pt"), checkpoint.load(work / "again.pt")
    sa, sb = a.state_dict(), b.state_dict()  # random init differs per run; the structure must not
    assert {k: v.shape for k, v in sa.items()} == {k: v.shape for k, v in sb.items()}


def test_prune_pickled_model_leaves_input_alone(follow_ups, work):
    runs, before = follow_ups
    r = runs["small"]
    assert r.returncode == 0, r.stderr
    assert digest(work / "small.pt") == before
    assert (work / "small_out.pt").exists()



def test_graph_png_is_a_picture(work):
    pytest.importorskip("matplotlib")
    r = run_cli(["graph", "torchvision:resnet18", *SHAPE, "--format", "png", "--out", "g.png"], work)
    assert r.returncode == 0, r.stderr
    assert (work / "g.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
