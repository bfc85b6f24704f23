#!/usr/bin/env bash
# One-call GPU check (issue 16, part 2): build the CUDA kernels for sm_90, run `pytest -m gpu` over
# tests/kernels, the standalone llm.c-style kernel binaries, and benchmarks/bench_kernels.py; every line of
# output goes to $OUT/gpu_check.log as it is printed, and a JSON summary to $OUT/summary.json.
#
#   device tool:  run(command="bash benchmarks/gpu_check.sh", timeout_s=480)
#   here (no GPU): GPU_CHECK_DRY=1 PYTHON=.venv/bin/python bash benchmarks/gpu_check.sh
#
# Environment:
#   OUT               where the results go (set by the device tool; default ./gpu_out)
#   PYTHON            the interpreter that holds torch with CUDA (default python3)
#   GPU_CHECK_BUDGET  seconds the whole script may take (default 420, inside the tool's 480 s)
#   GPU_CHECK_DRY=1   no GPU: check that every step's command resolves, build the kernels if nvcc is here
#                     (GPU_CHECK_DRY_BUILD=0 skips that), and run the GPU tests and the benchmark, which must
#                     skip cleanly; nothing is installed.
#   GPU_CHECK_ARCH    nvcc target (default sm_90: H100/H200)
#   GPU_CHECK_TESTS   what `pytest -m gpu` runs (default tests/kernels; add e.g. a runtime test file whose
#                     GPU tests run without TensorRT; its imports must not reach firmware_bridge)
#
# What comes back from $OUT (the device tool returns at most 8 files): gpu_check.log, summary.json,
# pytest.xml (JUnit), bench.json, bench_steps2.json. Build outputs stay in a scratch directory.
# Never imports firmware_bridge (a guard makes such an import fail) and needs no network.
# Steps are functions run through `phase` (indirectly, in a child bash), which shellcheck cannot see:
# shellcheck disable=SC2317
set -uo pipefail

OUT=${OUT:-./gpu_out}
PYTHON=${PYTHON:-python3}
DRY=${GPU_CHECK_DRY:-0}
ARCH=${GPU_CHECK_ARCH:-sm_90}
BUDGET=${GPU_CHECK_BUDGET:-420}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
KDIR=$WORK/kernels
PHASES=$WORK/phases.tsv
START=$SECONDS
DEADLINE=$((START + BUDGET))
: >"$PHASES"

# Run a Python module or script with an import guard: importing firmware_bridge fails loudly.
cat >"$WORK/guarded.py" <<'PY'
"""python guarded.py -m module args... | python guarded.py script.py args...: firmware_bridge cannot be imported."""
import importlib.abc
import runpy
import sys

BLOCKED = ("firmware_bridge",)


class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"gpu_check: {name} must not be imported on the GPU machine (no pyserial/python-can/cobs)")
        return None


sys.meta_path.insert(0, Block())
if sys.argv[1] == "-m":
    sys.argv = sys.argv[2:]
    runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
else:
    sys.argv = sys.argv[1:]
    runpy.run_path(sys.argv[0], run_name="__main__")
PY

# phase NAME LIMIT_S CMD...: run CMD under `timeout`, capped by what is left of the script's budget.
phase() {
    local name=$1 limit=$2 left rc t0
    shift 2
    left=$((DEADLINE - SECONDS))
    if ((left < 15)); then
        echo "== [$name] SKIPPED: the script's ${BUDGET}s budget is spent"
        printf '%s\t%s\t%s\t%s\n' "$name" "budget" 0 0 >>"$PHASES"
        return 1
    fi
    ((limit > left - 5)) && limit=$((left - 5))
    echo "== [$name] $(date -u +%H:%M:%S) limit ${limit}s: $*"
    t0=$SECONDS
    # The step is a shell function: run it in a child bash (functions and settings are exported) so that
    # `timeout` can signal its whole process group (pytest, nvcc, ...) when the limit passes.
    timeout -k 5 "$limit" bash -o pipefail -c '"$@"' "gpu_check-$name" "$@"
    rc=$?
    ((rc == 124 || rc == 137)) && echo "== [$name] TIMED OUT after ${limit}s"
    echo "== [$name] rc=$rc in $((SECONDS - t0))s"
    printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - t0))" "$limit" >>"$PHASES"
    return "$rc"
}

# A step's command must resolve before it runs (the dry run checks exactly this).
resolve() {
    local missing=0 what
    for what in "$@"; do
        if [[ $what == */* ]]; then
            [[ -e $what ]] || { echo "missing file: $what"; missing=1; }
        else
            command -v "$what" >/dev/null || { echo "command not found: $what"; missing=1; }
        fi
    done
    return "$missing"
}

env_report() {
    echo "host $(hostname), $(nproc) cores, $(date -u)"
    if command -v nvidia-smi >/dev/null; then
        nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv || true
    else
        echo "nvidia-smi: not found"
    fi
    "$NVCC" --version | tail -n 2
    "$PYTHON" - <<'PY'
import importlib, platform
print("python", platform.python_version())
for name in ("numpy", "torch", "cupy", "cuda.bindings", "pytest"):
    try:
        mod = importlib.import_module(name)
        print(f"{name} {getattr(mod, '__version__', '?')}")
    except Exception as exc:  # report, never fail the environment step
        print(f"{name}: not importable ({exc.__class__.__name__}: {exc})")
try:
    import torch
    print("torch CUDA", torch.version.cuda, "available", torch.cuda.is_available(),
          torch.cuda.get_device_name() if torch.cuda.is_available() else "")
except Exception as exc:
    print("torch CUDA: n/a", exc)
PY
}

install_project() {
    if [[ $DRY == 1 ]]; then  # never touch the interpreter here; check the project is importable instead
        "$PYTHON" -c "import edge_vla.kernels.loader, edge_vla.kernels.build; print('edge_vla.kernels importable')"
    else
        "$PYTHON" -m pip install --no-deps --no-build-isolation --no-input -q -e "$ROOT"
    fi
}

build_kernels() {
    # Fatbins through the project's own builder (what the loader loads, via EDGE_VLA_KERNEL_DIR) and the
    # standalone validation + timing binaries (kernels/Makefile's `bench` rule), compiled in parallel.
    local flags=(-O3 -std=c++17 --extra-device-vectorization -I"$ROOT/kernels" -DEV_STANDALONE
                 "-gencode=arch=compute_${ARCH#sm_},code=$ARCH")
    local pids=() rc=0 stem pid
    "$PYTHON" "$WORK/guarded.py" -m edge_vla.kernels.build --arch "$ARCH" --out "$KDIR" & pids+=($!)
    for stem in ode_step adaln_linear; do
        "$NVCC" "${flags[@]}" "$ROOT/kernels/$stem.cu" -o "$KDIR/$stem" & pids+=($!)
    done
    for pid in "${pids[@]}"; do wait "$pid" || rc=1; done
    ls -l "$KDIR"
    return "$rc"
}

run_standalone() {
    local rc=0 stem
    for stem in ode_step adaln_linear; do
        if [[ $DRY == 1 ]]; then
            [[ -x $KDIR/$stem || ${GPU_CHECK_DRY_BUILD:-1} == 0 ]] || { echo "not built: $KDIR/$stem"; rc=1; }
            echo "dry: would run $KDIR/$stem"
        else
            echo "-- $stem (CPU reference vs GPU, then timings)"
            timeout -k 5 60 "$KDIR/$stem" || rc=1
        fi
    done
    return "$rc"
}

run_pytest() {
    local extra=()
    "$PYTHON" -c "import pytest_timeout" 2>/dev/null && extra+=(--timeout=90)
    local targets
    read -r -a targets <<<"${GPU_CHECK_TESTS:-tests/kernels}"
    EDGE_VLA_KERNEL_DIR=$KDIR "$PYTHON" "$WORK/guarded.py" -m pytest -m gpu "${targets[@]}" -v -rfEs \
        -p no:cacheprovider --junitxml="$OUT/pytest.xml" "${extra[@]}"
}

check_dry_pytest() {  # no GPU: every GPU test must be collected and skip, none may fail or error
    run_pytest
    local rc=$?
    "$PYTHON" - "$OUT/pytest.xml" <<'PY'
import sys, xml.etree.ElementTree as ET
s = ET.parse(sys.argv[1]).getroot()
s = s if s.tag == "testsuite" else s[0]
n, skipped, bad = int(s.get("tests")), int(s.get("skipped")), int(s.get("failures")) + int(s.get("errors"))
print(f"dry pytest: {n} GPU tests collected, {skipped} skipped, {bad} failed/errored")
sys.exit(0 if n > 0 and skipped == n and bad == 0 else 1)
PY
    local check=$?
    return $((rc || check))
}

run_bench() {
    "$PYTHON" "$WORK/guarded.py" benchmarks/bench_kernels.py --steps 10 --json "$OUT/bench.json" || return $?
    if [[ $DRY == 1 ]]; then return 0; fi
    # The 2-step schedule (step-distilled students): ODE loop only, quick.
    "$PYTHON" "$WORK/guarded.py" benchmarks/bench_kernels.py --steps 2 --preset tiny --only ode --only launch \
        --reps 100 --json "$OUT/bench_steps2.json"
}

write_summary() {
    "$PYTHON" - "$PHASES" "$OUT" "$DRY" "$((SECONDS - START))" <<'PY'
import json, os, sys, tempfile, xml.etree.ElementTree as ET
phases_path, out, dry, total = sys.argv[1], sys.argv[2], sys.argv[3] == "1", int(sys.argv[4])
phases = []
for line in open(phases_path):
    name, rc, secs, limit = line.rstrip("\n").split("\t")
    phases.append({"phase": name, "rc": rc if rc == "budget" else int(rc), "seconds": int(secs), "limit_s": int(limit)})
doc = {"dry_run": dry, "total_seconds": total, "ok": all(p["rc"] == 0 for p in phases), "phases": phases}
junit = os.path.join(out, "pytest.xml")
if os.path.exists(junit):
    root = ET.parse(junit).getroot()
    s = root if root.tag == "testsuite" else root[0]
    doc["pytest"] = {k: int(s.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    doc["pytest"]["failed"] = [f"{c.get('classname')}::{c.get('name')}" for c in s.iter("testcase")
                               if c.find("failure") is not None or c.find("error") is not None]
for name in ("bench", "bench_steps2"):
    path = os.path.join(out, f"{name}.json")
    if os.path.exists(path):
        b = json.load(open(path))
        doc[name] = {"device": b["device"], "goals": b["goals"]}
fd, tmp = tempfile.mkstemp(dir=out, prefix=".summary.", suffix=".tmp")
with os.fdopen(fd, "w") as f:
    json.dump(doc, f, indent=1)
os.replace(tmp, os.path.join(out, "summary.json"))
print(json.dumps(doc, indent=1))
PY
}

main() {
    cd "$ROOT" || return 1
    echo "gpu_check: root $ROOT, out $OUT, scratch $WORK, python $PYTHON, arch $ARCH, dry $DRY, budget ${BUDGET}s"
    NVCC=$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)
    export NVCC PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
    export EDGE_VLA_KERNEL_CACHE=$WORK/cache  # nothing in ~/.cache
    export ROOT OUT PYTHON DRY ARCH WORK KDIR
    export -f resolve env_report install_project build_kernels run_standalone run_pytest check_dry_pytest run_bench
    mkdir -p "$KDIR"
    local failed=0

    phase resolve 10 resolve "$PYTHON" "$NVCC" timeout tests/kernels/test_gpu.py benchmarks/bench_kernels.py \
        kernels/ode_step.cu kernels/adaln_linear.cu || failed=1
    phase env 30 env_report || failed=1
    phase install 90 install_project || failed=1
    if [[ $DRY == 1 && ${GPU_CHECK_DRY_BUILD:-1} == 0 ]]; then
        echo "== [build] skipped (GPU_CHECK_DRY_BUILD=0)"
    else
        phase build 150 build_kernels || failed=1
    fi
    phase standalone 130 run_standalone || failed=1
    if [[ $DRY == 1 ]]; then
        phase pytest 150 check_dry_pytest || failed=1
    else
        phase pytest 150 run_pytest || failed=1
    fi
    phase bench 200 run_bench || failed=1
    write_summary || failed=1
    echo "gpu_check: $([[ $failed == 0 ]] && echo OK || echo FAILED) in $((SECONDS - START))s; results in $OUT"
    return "$failed"
}

main 2>&1 | tee "$OUT/gpu_check.log"
rc=${PIPESTATUS[0]}
rm -rf "$WORK"
exit "$rc"
