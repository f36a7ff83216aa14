"""Helper of benchmarks/gpu_check.sh: a pytest plugin and a small command line.

As a pytest plugin (``PYTHONPATH=benchmarks python -m pytest -p gpu_check_stage ...``):

- SIGTERM (what coreutils ``timeout`` sends when a stage runs out of time) becomes a
  KeyboardInterrupt, so pytest stops as after Ctrl-C: it prints its summary and still
  writes the ``--junitxml`` report of the tests that ran.
- ``GPU_CHECK_COMPILED=exclude`` deselects the tests that run torch.compile (Inductor),
  ``=only`` keeps only those (the compiled variants run last, in stage H): a test whose
  name says ``torch_compile`` (unless its ``compiler`` parameter is an eager backend), a
  ``compile*`` parameter that is on (``compile_mode="on"``), or a ``provider`` parameter
  naming a compiled provider (``compile``, ``chi2_compile``, ``fp32-eager-compiled``).

As a command line (``python benchmarks/gpu_check_stage.py COMMAND``; none of these
imports torch except ``env``, ``built`` and ``check``):

    env FILE               the environment (versions, GPU, date) -> FILE; prints the results
                           folder name of this device (benchmarks/_env.py's device_slug)
    built                  exit 0 if ipfm_fast is installed from this checkout with a CUDA
                           build for sm_90 newer than its sources (stage A can skip the build)
    check FILE [--dry-run] `ipfm-fast info` as JSON -> FILE; fails unless the extension is
                           loaded (and, on a GPU, built with CUDA for sm_90 and seeing the GPU)
    summary WORK OUT.json  summary.json from WORK/plan.tsv, WORK/steps.tsv, WORK/current
    table SUMMARY.json     the stage table, for the end of the log
"""

import datetime
import glob
import json
import os
import platform
import re
import signal
import subprocess
import sys
import xml.etree.ElementTree as ET

# --------------------------------------------------------------------------------------
# pytest plugin
# --------------------------------------------------------------------------------------

_EAGER_COMPILERS = ("off", "false", "none", "eager", "aot_eager")


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum} (stage timeout)")


def pytest_configure(config):
    try:
        signal.signal(signal.SIGTERM, _interrupt)
    except ValueError:  # not the main thread
        pass


def is_compiled(item):
    """Whether a collected test runs torch.compile with a real (Inductor) backend."""
    params = getattr(getattr(item, "callspec", None), "params", {})
    name = getattr(item, "originalname", None) or item.name
    if "torch_compile" in name:
        compiler = params.get("compiler", params.get("backend_name"))
        return str(compiler).lower() not in _EAGER_COMPILERS if compiler is not None else True
    for key, value in params.items():
        text = str(value).lower()
        if "compile" in key.lower() and text not in _EAGER_COMPILERS:
            return True
        if key.lower() == "provider" and "compile" in text:
            return True
    return False


def pytest_collection_modifyitems(config, items):
    mode = os.environ.get("GPU_CHECK_COMPILED", "all")
    if mode not in ("exclude", "only"):
        return
    keep = [it for it in items if is_compiled(it) == (mode == "only")]
    if len(keep) != len(items):
        dropped = [it for it in items if is_compiled(it) != (mode == "only")]
        config.hook.pytest_deselected(items=dropped)
        items[:] = keep


# --------------------------------------------------------------------------------------
# environment
# --------------------------------------------------------------------------------------


def _run(cmd):
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
        return out.stdout.strip() if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def _now():
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def collect_env():
    env = {"date": _now(), "python": platform.python_version(), "python_executable": sys.executable,
           "platform": platform.platform(), "machine": platform.machine(), "cpu_count": os.cpu_count()}
    slug = None
    try:
        import torch

        env.update(torch=torch.__version__, cuda_runtime=torch.version.cuda, cuda_available=torch.cuda.is_available(),
                   cudnn=torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
                   cpu_threads=torch.get_num_threads())
        if torch.cuda.is_available():
            name = torch.cuda.get_device_name()
            props = torch.cuda.get_device_properties(0)
            env.update(gpu=name, gpu_count=torch.cuda.device_count(), gpu_capability=".".join(map(str, (props.major, props.minor))),
                       gpu_memory_gib=round(props.total_memory / 2**30, 1),
                       gpu_multiprocessors=props.multi_processor_count)
        else:
            name = f"cpu-{torch.get_num_threads()}t"
            env["gpu"] = None
        slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")  # as benchmarks/_env.py device_slug
    except Exception as err:  # noqa: BLE001 - a broken torch is what this check must report
        env["torch_error"] = f"{type(err).__name__}: {err}"
    try:
        import triton

        env["triton"] = triton.__version__
    except Exception as err:  # noqa: BLE001
        env["triton_error"] = f"{type(err).__name__}: {err}"
    smi = _run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"])
    if smi:
        env["nvidia_smi"] = smi
    nvcc = _run(["nvcc", "--version"])
    if nvcc is None and os.path.exists("/usr/local/cuda/bin/nvcc"):
        nvcc = _run(["/usr/local/cuda/bin/nvcc", "--version"])
    env["nvcc"] = nvcc.splitlines()[-1] if nvcc else None
    git = _run(["git", "rev-parse", "--short", "HEAD"])
    if git:
        env["git"] = git
        dirty = _run(["git", "status", "--porcelain", "--untracked-files=no"])
        env["git_dirty"] = bool(dirty)
    env["results_folder"] = slug
    return env, slug


# --------------------------------------------------------------------------------------
# the build
# --------------------------------------------------------------------------------------


def _newest_source(root):
    paths = [os.path.join(root, p) for p in ("setup.py", "pyproject.toml")]
    paths += glob.glob(os.path.join(root, "csrc", "**", "*"), recursive=True)
    return max(os.path.getmtime(p) for p in paths if os.path.isfile(p))


def built(root):
    """(True, why) when ipfm_fast imports from ``root`` with a CUDA build for sm_90 newer than
    every C++/CUDA source, else (False, why)."""
    try:
        import ipfm_fast
        from ipfm_fast import _ext
    except Exception as err:  # noqa: BLE001
        return False, f"import ipfm_fast failed: {err}"
    where = os.path.realpath(os.path.dirname(ipfm_fast.__file__))
    if not where.startswith(os.path.realpath(root) + os.sep):
        return False, f"ipfm_fast imports from {where}, not from this checkout"
    C = _ext._C
    if C is None:
        return False, f"extension not loaded ({_ext.load_error})"
    if not C.has_cuda or "90" not in str(C.cuda_archs).split(";"):
        return False, f"extension built without CUDA for sm_90 (has_cuda={C.has_cuda}, archs={C.cuda_archs!r})"
    try:
        import importlib.metadata as md

        md.distribution("ipfm_fast")
    except Exception:  # noqa: BLE001
        return False, "ipfm_fast is not pip-installed"
    if os.path.getmtime(C.__file__) < _newest_source(root):
        return False, "sources changed since the build"
    return True, f"{C.__file__} (CUDA archs {C.cuda_archs}) is newer than the sources"


def check(path, dry_run):
    from ipfm_fast.info import collect

    import torch

    info = collect()
    with open(path, "w") as f:
        json.dump(info, f, indent=2)
    ext = info["extension"]
    problems = []
    if not ext["loaded"]:
        problems.append(f"extension not loaded: {ext.get('error')}")
    if not dry_run:
        if not torch.cuda.is_available():
            problems.append("torch sees no CUDA device")
        if ext["loaded"] and not ext.get("cuda"):
            problems.append(f"extension built without CUDA: {ext.get('cuda_skip_reason')}")
        if ext.get("cuda") and "90" not in str(ext.get("cuda_archs")).split(";"):
            problems.append(f"extension not built for sm_90: {ext.get('cuda_archs')}")
        if ext.get("cuda") and not ext.get("cuda_devices_seen_by_extension"):
            problems.append("the extension's CUDA runtime sees no device")
        for backend in ("cuda", "triton"):
            why = info["backends"].get("cuda:0", info["backends"].get("cuda", {})).get(backend, "no cuda device")
            if why:
                problems.append(f"{backend} backend unavailable on cuda: {why}")
    print(json.dumps({"extension": ext, "auto": info["auto"]}, indent=2))
    for p in problems:
        print("PROBLEM:", p)
    return 1 if problems else 0


# --------------------------------------------------------------------------------------
# summary.json
# --------------------------------------------------------------------------------------


def _read_tsv(path, fields):
    rows = []
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                parts = line.rstrip("\n").split("\t")
                if len(parts) >= len(fields) - 1:
                    rows.append(dict(zip(fields, parts + [""] * (len(fields) - len(parts)))))
    return rows


def junit_counts(path):
    """{tests, passed, failed, errors, skipped, failures: [first 30 ids]} of a junit xml."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return None
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {k: sum(int(s.get(k, 0) or 0) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    failed = []
    for case in root.iter("testcase"):
        if case.find("failure") is not None or case.find("error") is not None:
            failed.append(f"{case.get('classname', '')}::{case.get('name', '')}")
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    counts["failed_tests"] = failed[:30]
    return counts


STEP_FIELDS = ["stage", "step", "status", "rc", "seconds", "timeout_s", "log", "junit", "note"]
PLAN_FIELDS = ["stage", "title", "expected", "timeout_s", "selected"]


def _stage_status(steps):
    statuses = [s["status"] for s in steps]
    if "timeout" in statuses:
        return "timeout"
    if "failed" in statuses:
        return "failed"
    if all(s == "skipped" for s in statuses):
        return "skipped"
    if "skipped" in statuses:  # a later step found no time left: the stage did not finish
        return "timeout"
    return "ok"


def summarize(work, out, final=False):
    plan = _read_tsv(os.path.join(work, "plan.tsv"), PLAN_FIELDS)
    steps = _read_tsv(os.path.join(work, "steps.tsv"), STEP_FIELDS)
    meta = {}
    if os.path.exists(os.path.join(work, "meta.json")):
        with open(os.path.join(work, "meta.json")) as f:
            meta = json.load(f)
    env = {}
    if os.path.exists(os.path.join(work, "gpu_check", "env.json")):
        with open(os.path.join(work, "gpu_check", "env.json")) as f:
            env = json.load(f)
    current = None
    if os.path.exists(os.path.join(work, "current")):
        with open(os.path.join(work, "current")) as f:
            parts = f.read().strip().split("\t")
        if len(parts) >= 2:
            current = {"stage": parts[0], "step": parts[1], "started": parts[2] if len(parts) > 2 else None}
    by_stage = {}
    for s in steps:
        by_stage.setdefault(s.pop("stage"), []).append(s)
    stages = []
    for p in plan:
        mine = by_stage.get(p["stage"], [])
        for s in mine:
            s["rc"] = int(s["rc"]) if s["rc"].lstrip("-").isdigit() else None
            s["seconds"] = float(s["seconds"]) if s["seconds"] else 0.0
            s["timeout_s"] = int(s["timeout_s"]) if s["timeout_s"].isdigit() else None
            if s["junit"]:
                s["tests"] = junit_counts(os.path.join(work, "gpu_check", s["junit"]))
            for k in ("log", "junit", "note"):
                if not s[k]:
                    s[k] = None
        entry = {"stage": p["stage"], "title": p["title"], "expected": p["expected"],
                 "timeout_s": int(p["timeout_s"]), "steps": mine}
        if p["selected"] != "1":
            entry.update(status="skipped", rc=None, seconds=0.0, note="not in STAGES")
        elif current and current["stage"] == p["stage"]:
            entry.update(status="running", rc=None, seconds=round(sum(s["seconds"] for s in mine), 1),
                         note=f"step {current['step']} running (the run was cut off here if this is the last summary)")
        elif not mine:
            entry.update(status="skipped" if final else "pending", rc=None, seconds=0.0,
                         note="not reached" if final else "not started yet")
        else:
            rcs = [s["rc"] for s in mine if s["rc"]]
            notes = [f"{s['step']}: {s['note']}" for s in mine if s["note"]]
            entry.update(status=_stage_status(mine), rc=rcs[0] if rcs else 0,
                         seconds=round(sum(s["seconds"] for s in mine), 1), note="; ".join(notes) or None)
        stages.append(entry)
    selected = [s for s in stages if s["note"] != "not in STAGES"]
    summary = {
        "script": "benchmarks/gpu_check.sh",
        **meta,
        "updated": _now(),
        "finished": final,
        "ok": final and all(s["status"] == "ok" for s in selected),
        "counts": {k: sum(s["status"] == k for s in stages)
                   for k in ("ok", "failed", "timeout", "skipped", "running", "pending")},
        "env": env,
        "stages": stages,
    }
    tmp = out + ".part"
    with open(tmp, "w") as f:
        json.dump(summary, f, indent=2)
    os.replace(tmp, out)
    return summary


def table(summary):
    lines = ["", f"gpu_check {'(dry run) ' if summary.get('dry_run') else ''}"
                 f"on {summary['env'].get('gpu') or 'CPU'}: torch {summary['env'].get('torch')}, "
                 f"CUDA {summary['env'].get('cuda_runtime')}, triton {summary['env'].get('triton')}, "
                 f"python {summary['env'].get('python')}",
             f"{'stage':5} {'status':8} {'rc':>4} {'seconds':>8}  {'tests (pass/fail/err/skip)':26}  title / note"]
    for s in summary["stages"]:
        tests = [st["tests"] for st in s["steps"] if st.get("tests")]
        t = (f"{sum(x['passed'] for x in tests)}/{sum(x['failures'] for x in tests)}/"
             f"{sum(x['errors'] for x in tests)}/{sum(x['skipped'] for x in tests)}") if tests else "-"
        rc = "-" if s["rc"] is None else str(s["rc"])
        note = f" [{s['note']}]" if s.get("note") else ""
        lines.append(f"{s['stage']:5} {s['status']:8} {rc:>4} {s['seconds']:8.1f}  {t:26}  {s['title']}{note}")
        for x in tests:
            for name in x["failed_tests"][:10]:
                lines.append(f"{'':50}FAILED {name}")
    lines.append(f"all selected stages ok: {summary['ok']}")
    return "\n".join(lines)


def main(argv):
    cmd, args = argv[0], argv[1:]
    if cmd == "env":
        env, slug = collect_env()
        with open(args[0], "w") as f:
            json.dump(env, f, indent=2)
        print(slug or "unknown-device")
        return 0
    if cmd == "built":
        ok, why = built(args[0] if args else os.getcwd())
        print(why)
        return 0 if ok else 1
    if cmd == "check":
        return check(args[0], "--dry-run" in args)
    if cmd == "summary":
        summarize(args[0], args[1], final="--final" in args)
        return 0
    if cmd == "table":
        with open(args[0]) as f:
            print(table(json.load(f)))
        return 0
    print(__doc__)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
