#!/usr/bin/env bash
# One GPU check of this project, at most 8 minutes on one H100/H200-class GPU, ending in a summary block
# (one line per figure) to paste into docs/scaling.md ("Training the networks of one curve at once").
#
#     bash benchmarks/device_check.sh                 # raw outputs under $OUT, else /tmp/device_check
#
# Parts, each under its own `timeout`, each going on after a failing one:
#   env          python, torch, CUDA, and which optional packages are missing (what needs them is skipped)
#   cuda tests   the tests marked skipif-no-CUDA (found in tests/*.py), with pytest          90 s
#   prune speed  ntksap.prune NTK-SAP on ResNet-20, T=20, R=5 (prune_speed.py --only ours)   60 s
#   epoch time   ResNet-20 epoch: eager, stacked K=9, torch.compile, masked, stacked masked,
#                then stacked (masked) under torch.compile(mode="reduce-overhead") (CUDA graphs)       200 s
#   prune memory ResNet-50 NTK-SAP prune at noise batch 64 and 256 (prune_memory.py)        120 s
#   epoch NCHW   lead 1: stacked masked, eager and with CUDA graphs, in NCHW instead of channels-last
#                (17 % of a stacked step is cuDNN layout conversion)                               100 s
#   epoch K=63   lead 2: stacked masked with K = 63 networks (one seed's 7 runs x 9 sparsities)    60 s
#                (the leads run after the required parts, with what those left less the projection's 20 s)
#   projection   projected hours of every named set from the epoch times                     20 s
# Without CUDA the GPU parts print "skipped: no CUDA" and the epoch-time part runs a short CPU smoke test.
# Installs nothing: runs with the python found there (python3, else python; or $PYTHON), with the repository
# root on PYTHONPATH. Environment knobs: PYTHON, OUT, DEVICE_CHECK_BUDGET (total seconds, 480),
# T_TESTS, T_PRUNE_SPEED, T_EPOCH, T_PRUNE_MEMORY, T_EPOCH_NCHW, T_EPOCH_WIDE, T_PROJECTION (seconds per
# part), EPOCH_IMAGES (25600), EPOCH_WIDE_K (63).
set -u
set -o pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 1
OUT_DIR=${OUT:-/tmp/device_check}
mkdir -p "$OUT_DIR"
SCRATCH=$(mktemp -d "${TMPDIR:-/tmp}/device_check.XXXXXX")
trap 'rm -rf "$SCRATCH"' EXIT
LOG="$OUT_DIR/device_check.log"
: >"$LOG"
exec > >(tee -a "$LOG") 2>&1
TEE_PID=$!

PY=${PYTHON:-$(command -v python3 || command -v python || true)}
if [ -z "$PY" ]; then
    echo "device check: no python3 or python on PATH (set PYTHON=...)"
    exit 1
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export PYTHONDONTWRITEBYTECODE=1

BUDGET=${DEVICE_CHECK_BUDGET:-480}
T_TESTS=${T_TESTS:-90}
T_PRUNE_SPEED=${T_PRUNE_SPEED:-60}
T_EPOCH=${T_EPOCH:-200}
T_EPOCH_NCHW=${T_EPOCH_NCHW:-100}
T_EPOCH_WIDE=${T_EPOCH_WIDE:-60}
EPOCH_WIDE_K=${EPOCH_WIDE_K:-63}
T_PRUNE_MEMORY=${T_PRUNE_MEMORY:-120}
T_PROJECTION=${T_PROJECTION:-20}
EPOCH_IMAGES=${EPOCH_IMAGES:-25600}
HAVE_TIMEOUT=0
command -v timeout >/dev/null 2>&1 && HAVE_TIMEOUT=1
START=$SECONDS
SUMMARY=()

add() { SUMMARY+=("$1"); }

# run_part NAME SECONDS LOGFILE CMD...: run CMD under `timeout` (shortened to what the budget has left, less
# RESERVE_S seconds kept for later parts), its output to the screen and to LOGFILE; sets PART_RC (124: timed
# out) and never stops the script.
run_part() {
    local name=$1 limit=$2 log=$3
    shift 3
    local left=$((BUDGET - (SECONDS - START) - 10 - ${RESERVE_S:-0}))
    if [ "$left" -lt "$limit" ]; then limit=$left; fi
    echo
    echo "==== $name (limit ${limit} s, $((SECONDS - START)) s elapsed) ===="
    if [ "$limit" -lt 5 ]; then
        echo "skipped: the ${BUDGET} s budget is spent"
        PART_RC=125
        : >"$log"
        return 0
    fi
    local t0=$SECONDS
    if [ "$HAVE_TIMEOUT" = 1 ]; then
        timeout -k 5 "$limit" "$@" 2>&1 | tee "$log" | cut -c1-1000   # (a JSON line of every mask entry: cut on screen)
    else
        "$@" 2>&1 | tee "$log" | cut -c1-1000
    fi
    PART_RC=${PIPESTATUS[0]}
    echo "---- $name: exit $PART_RC after $((SECONDS - t0)) s$([ "$PART_RC" = 124 ] && echo ' (timed out)')"
    return 0
}

status_of() {  # a word for a part's exit status
    case "$1" in
        0) echo "ok" ;;
        124) echo "timed out" ;;
        125) echo "skipped (budget spent)" ;;
        *) echo "failed (exit $1)" ;;
    esac
}

# ---------------------------------------------------------------------------------------------------
echo "==== env ===="
echo "device check of $ROOT at $(date -u '+%Y-%m-%d %H:%M UTC'), python $PY, outputs in $OUT_DIR"
[ "$HAVE_TIMEOUT" = 1 ] || echo "note: no 'timeout' command: the parts run without their time limits"
"$PY" - "$SCRATCH/env.sh" <<'EOF'
import importlib, sys
out = open(sys.argv[1], "w")
def have(name, flag):
    try:
        importlib.import_module(name)
        ok, why = True, ""
    except Exception as exc:  # ImportError, or a broken install
        ok, why = False, f"{type(exc).__name__}: {exc}"
    out.write(f"{flag}={int(ok)}\n")
    return ok, why
print(f"python {sys.version.split()[0]} at {sys.executable}")
ok, why = have("torch", "HAVE_TORCH")
if not ok:
    print(f"torch: MISSING ({why}); nothing can run"); out.write("HAVE_CUDA=0\n"); sys.exit(0)
import torch
cuda = torch.cuda.is_available()
out.write(f"HAVE_CUDA={int(cuda)}\n")
gpu = ""
if cuda:
    p = torch.cuda.get_device_properties(0)
    gpu = f"{p.name}, {p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs, CUDA {torch.version.cuda}"
    import shlex; out.write(f"GPU_NAME={shlex.quote(p.name)}\n")
print(f"torch {torch.__version__}; CUDA: {gpu or 'not available'}")
needs = {  # package -> what needs it
    "numpy": "everything (ntksap.data, tests/reference.py)", "pandas": "ntksap.masks, ntksap.train",
    "tqdm": "ntksap.pruning, ntksap.train", "torchvision": "prune memory (ResNet-50), projection (ResNet-18/50 MACs)",
    "pytest": "cuda tests", "yaml": "projection (the named sets)",
    "pydantic": "ntksap.config/params/protocol (test_prune_set; epoch_time.py works around it)",
    "hydra": "ntksap.config.compose (projection falls back to its own YAML reader)", "omegaconf": "hydra",
}
missing = []
for mod, what in needs.items():
    ok, why = have(mod, "HAVE_" + mod.upper())
    if not ok:
        missing.append(f"{mod} (needed by {what})")
for mod in ("ntksap.pruning", "ntksap.data", "ntksap.stacked", "ntksap.train"):
    ok, why = have(mod, "HAVE_" + mod.replace(".", "_").upper())
    print(f"import {mod}: {'ok' if ok else 'FAILED: ' + why}")
print("missing packages: " + ("; ".join(missing) if missing else "none"))
EOF
HAVE_TORCH=0 HAVE_CUDA=0 HAVE_PYTEST=0 HAVE_TORCHVISION=0 HAVE_YAML=0 HAVE_NTKSAP_PRUNING=0 HAVE_NTKSAP_DATA=0
GPU_NAME=""
# shellcheck disable=SC1091
[ -f "$SCRATCH/env.sh" ] && . "$SCRATCH/env.sh"
if [ "$HAVE_CUDA" = 1 ]; then
    add "device: $GPU_NAME; $("$PY" -c 'import torch; print("torch", torch.__version__)' 2>/dev/null)"
else
    add "device: no CUDA (CPU smoke run: no GPU figures)"
fi
if [ "$HAVE_TORCH" != 1 ]; then
    echo "device check: torch cannot be imported; stopping"
    exit 1
fi

# ---------------------------------------------------------------------------------------------------
# cuda tests: every test function (or class / module) with a skipif whose condition mentions cuda, from the
# test modules that import here (a module that needs a missing package is named, not run)
cat >"$SCRATCH/find_cuda_tests.py" <<'EOF'
import ast, importlib, sys
from pathlib import Path
sys.path[:0] = ["tests", "."]
nodes, bad = [], {}
def marked(decorators, src):
    return any("skipif" in (s := ast.get_source_segment(src, d) or "") and "cuda" in s for d in decorators)
for f in sorted(Path("tests").glob("test_*.py")):
    src = f.read_text()
    tree = ast.parse(src)
    module_wide = any(isinstance(n, ast.Assign) and any(getattr(t, "id", "") == "pytestmark" for t in n.targets)
                      and "cuda" in (ast.get_source_segment(src, n.value) or "") for n in tree.body)
    found = []
    for n in tree.body:
        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name.startswith("test"):
            if module_wide or marked(n.decorator_list, src):
                found.append(f"{f}::{n.name}")
        elif isinstance(n, ast.ClassDef) and n.name.startswith("Test"):
            if module_wide or marked(n.decorator_list, src):
                found.append(f"{f}::{n.name}")
            else:
                found += [f"{f}::{n.name}::{m.name}" for m in n.body
                          if isinstance(m, ast.FunctionDef) and m.name.startswith("test") and marked(m.decorator_list, src)]
    if not found:
        continue
    try:
        importlib.import_module(f.stem)
    except Exception as exc:
        bad[str(f)] = f"{type(exc).__name__}: {exc}"
        for node in found:
            print(f"cannot run {node}: its module does not import ({bad[str(f)]})")
        continue
    nodes += found
for node in nodes:
    print(f"cuda test: {node}")
Path(sys.argv[1]).write_text("".join(n + "\n" for n in nodes))
print(f"{len(nodes)} CUDA tests to run; {sum(1 for _ in bad)} test modules do not import")
EOF
echo
echo "==== cuda tests: which ===="
timeout_cmd=()
[ "$HAVE_TIMEOUT" = 1 ] && timeout_cmd=(timeout -k 5 30)
"${timeout_cmd[@]}" "$PY" "$SCRATCH/find_cuda_tests.py" "$SCRATCH/cuda_tests.txt" 2>&1 | tee "$SCRATCH/discovery.log"
NODES=()
if [ -f "$SCRATCH/cuda_tests.txt" ]; then mapfile -t NODES <"$SCRATCH/cuda_tests.txt"; fi
unrunnable=$(grep -c '^cannot run' "$SCRATCH/discovery.log" || true)
if [ "$HAVE_CUDA" != 1 ]; then
    echo "skipped: no CUDA"
    add "cuda tests: skipped: no CUDA (${#NODES[@]} found that would run, $unrunnable not importable here)"
elif [ "$HAVE_PYTEST" != 1 ]; then
    echo "skipped: pytest missing"
    add "cuda tests: skipped: pytest missing"
elif [ "${#NODES[@]}" -eq 0 ]; then
    add "cuda tests: none could run ($unrunnable not importable; see device_check.log)"
else
    run_part "cuda tests" "$T_TESTS" "$SCRATCH/tests.log" \
        "$PY" -m pytest -q -p no:cacheprovider --rootdir "$ROOT" "${NODES[@]}"
    line=$(grep -E '[0-9]+ (passed|failed|error)' "$SCRATCH/tests.log" | tail -n 1 | sed 's/=//g; s/^ *//; s/ *$//')
    add "cuda tests: $(status_of "$PART_RC"): ${line:-no pytest summary}$([ "$unrunnable" -gt 0 ] && echo "; $unrunnable not importable (missing packages)")"
fi

# ---------------------------------------------------------------------------------------------------
if [ "$HAVE_CUDA" != 1 ]; then
    echo; echo "==== prune speed ===="; echo "skipped: no CUDA"
    add "prune speed: skipped: no CUDA"
elif [ "$HAVE_NTKSAP_PRUNING" != 1 ]; then
    echo; echo "==== prune speed ===="; echo "skipped: ntksap.pruning does not import (see env)"
    add "prune speed: skipped: ntksap.pruning does not import"
else
    run_part "prune speed" "$T_PRUNE_SPEED" "$SCRATCH/prune_speed.log" \
        "$PY" benchmarks/prune_speed.py --only ours --device cuda
    # its last line is one JSON object (with every mask entry and score, in newer versions): keep the figures
    line=$("$PY" - "$SCRATCH/prune_speed.log" "$OUT_DIR/prune_speed.json" <<'EOF' 2>/dev/null
import json, sys
r = json.loads(open(sys.argv[1]).read().strip().splitlines()[-1])
r = {k: v for k, v in r.items() if not isinstance(v, (list, dict))}
open(sys.argv[2], "w").write(json.dumps(r, indent=1) + "\n")
print(f"{r['seconds']:.2f} s wall, {r['cpu_seconds']:.2f} s CPU, CUDA peak {r['peak_mb']:.0f} MB, kept {r['kept']} weights")
EOF
)
    add "prune speed (NTK-SAP, ResNet-20, 89.26 %, T=20, R=5, 100 noise inputs, batch 256, cuda): $(status_of "$PART_RC")${line:+: $line}"
fi

# ---------------------------------------------------------------------------------------------------
EPOCH_JSON="$OUT_DIR/epoch_time.json"
rm -f "$EPOCH_JSON"
if [ "$HAVE_NTKSAP_DATA" != 1 ]; then
    echo; echo "==== epoch time ===="; echo "skipped: ntksap.data does not import (see env)"
    add "epoch time: skipped: ntksap.data does not import"
else
    if [ "$HAVE_CUDA" = 1 ]; then
        run_part "epoch time" "$T_EPOCH" "$SCRATCH/epoch.log" \
            "$PY" benchmarks/epoch_time.py --device cuda --images "$EPOCH_IMAGES" --k 9 --json "$EPOCH_JSON" \
            --variants "eager,stacked,compile,masked,stacked_masked,stacked_compile_graphs,stacked_masked_compile_graphs"
        what="cuda"
    else
        run_part "epoch time (CPU smoke: 256 images, K=2, no compile)" "$T_EPOCH" "$SCRATCH/epoch.log" \
            "$PY" benchmarks/epoch_time.py --device cpu --images 256 --k 2 --threads 1 --compile off \
            --variants eager,stacked --json "$EPOCH_JSON"
        what="CPU smoke, not a GPU figure"
    fi
    epoch_status=$(status_of "$PART_RC")
    if [ -f "$EPOCH_JSON" ]; then
        "$PY" - "$EPOCH_JSON" "$what" "$epoch_status" >"$SCRATCH/epoch_summary.txt" <<'EOF'
import json, sys
d = json.load(open(sys.argv[1]))
what, status = sys.argv[2], sys.argv[3]
rows = d["rows"]
eager = rows.get("eager", {})
print(f"epoch time ({what}; ResNet-20, batch {d['batch_size']}, {d['images']} images timed, extrapolated to "
      f"{d['epoch_images']} + {d['epoch_test_images']} test; amp {'bf16' if d['amp'] else 'off'}): part {status}")
for v, r in rows.items():
    if r.get("status") != "ok":
        print(f"epoch time {v}: {r.get('status')}")
        continue
    s = f"epoch time {v}: {r['epoch_s']:.2f} s/epoch"
    if r["networks"] > 1:
        s += f" for K={r['networks']} networks = {r['per_network_epoch_s']:.2f} s per network"
    if "compile" in v:
        s += f" (compile {r['compile_s']:.0f} s once)"
    if eager.get("status") == "ok" and v != "eager":
        s += f", {eager['per_network_epoch_s'] / r['per_network_epoch_s']:.2f}x vs eager"
    if v.startswith("stacked_masked") and rows.get("masked", {}).get("status") == "ok":
        s += f", {rows['masked']['per_network_epoch_s'] / r['per_network_epoch_s']:.2f}x vs masked"
    print(s)
for v in ("eager", "stacked", "compile", "masked", "stacked_masked", "stacked_compile_graphs",
          "stacked_masked_compile_graphs"):
    if v not in rows and d["device"] != "cpu":
        print(f"epoch time {v}: not reached ({status})")
EOF
        while IFS= read -r l; do add "$l"; done <"$SCRATCH/epoch_summary.txt"
    else
        add "epoch time: $epoch_status, no results"
    fi
fi

# ---------------------------------------------------------------------------------------------------
if [ "$HAVE_CUDA" != 1 ]; then
    echo; echo "==== prune memory ===="; echo "skipped: no CUDA"
    add "prune memory: skipped: no CUDA"
elif [ "$HAVE_TORCHVISION" != 1 ] || [ "$HAVE_NTKSAP_PRUNING" != 1 ]; then
    echo; echo "==== prune memory ===="; echo "skipped: needs torchvision and ntksap.pruning (see env)"
    add "prune memory: skipped: needs torchvision and ntksap.pruning"
else
    run_part "prune memory" "$T_PRUNE_MEMORY" "$SCRATCH/memory.log" \
        "$PY" benchmarks/prune_memory.py --device cuda --sizes 64 256 --batches 2 --threads "$(nproc 2>/dev/null || echo 8)"
    rows=$(awk '$1 ~ /^[0-9]+$/ && $2 ~ /^[0-9]+$/ && NF == 6 {
        printf "prune memory ResNet-50 NTK-SAP, noise batch B=%s, %s mini-batch(es): CUDA peak %s GB, saved-for-backward %s GB, %s s/input\n",
        $1, $2, $5, $3, $6 }' "$SCRATCH/memory.log")
    add "prune memory (ResNet-50, 224x224, one iteration, cuda): $(status_of "$PART_RC")"
    if [ -n "$rows" ]; then
        while IFS= read -r l; do add "$l"; done <<<"$rows"
    fi
    extra=$(grep -E '^(ratio|saved-for-backward peak|work:|measured) ' "$SCRATCH/memory.log" | sed 's/^/prune memory: /')
    if [ -n "$extra" ]; then
        while IFS= read -r l; do add "$l"; done <<<"$extra"
    fi
fi

# ---------------------------------------------------------------------------------------------------
# leads toward 3 GPU-hours (docs/scaling.md), after the required parts, each with what the budget has left
# less the projection's time, each line compared with the epoch part's row of the same variant:
#   epoch NCHW    the stacked masked rows with --channels-last off (layout conversions: 17 % of a stacked step)
#   epoch K=wide  stacked masked with K = EPOCH_WIDE_K networks (the 7 runs x 9 sparsities of one seed share
#                 an initialisation: 63) instead of 9
# epoch_lead NAME JSON LIMIT EPOCH_TIME_ARGS...
epoch_lead() {
    local name=$1 json=$2 limit=$3
    shift 3
    rm -f "$json"
    if [ "$HAVE_CUDA" != 1 ]; then
        echo; echo "==== $name ===="; echo "skipped: no CUDA"
        add "$name: skipped: no CUDA"
        return 0
    elif [ "$HAVE_NTKSAP_DATA" != 1 ]; then
        echo; echo "==== $name ===="; echo "skipped: ntksap.data does not import (see env)"
        add "$name: skipped: ntksap.data does not import"
        return 0
    fi
    RESERVE_S=$T_PROJECTION run_part "$name" "$limit" "$SCRATCH/$(basename "$json" .json).log" \
        "$PY" benchmarks/epoch_time.py --device cuda --images "$EPOCH_IMAGES" --json "$json" "$@"
    local st
    st=$(status_of "$PART_RC")
    if [ ! -f "$json" ]; then
        add "$name: $st, no results"
        return 0
    fi
    "$PY" - "$json" "$EPOCH_JSON" "$name" "$st" >"$SCRATCH/lead_summary.txt" <<'EOF'
import json, os, sys
d = json.load(open(sys.argv[1]))
base = json.load(open(sys.argv[2])) if os.path.exists(sys.argv[2]) else None
name, status = sys.argv[3], sys.argv[4]
layout = lambda j: "channels-last" if j["channels_last"] else "NCHW"
than = f"the epoch part: K={base['k']}, {layout(base)}" if base else "the epoch part: no results"
print(f"{name} (K={d['k']}, {layout(d)}; {than}): part {status}")
base = base or {"rows": {}}
for v, r in d["rows"].items():
    if r.get("status") != "ok":
        print(f"{name} {v}: {r.get('status')}")
        continue
    s = f"{name} {v}: {r['per_network_epoch_s']:.2f} s per network"
    if "compile" in v:
        s += f" (compile {r['compile_s']:.0f} s once)"
    b = base["rows"].get(v, {})
    if b.get("status") == "ok":
        s += (f"; the epoch part's row {b['per_network_epoch_s']:.2f} s: "
              f"{b['per_network_epoch_s'] / r['per_network_epoch_s']:.2f}x")
    print(s)
EOF
    while IFS= read -r l; do add "$l"; done <"$SCRATCH/lead_summary.txt"
}

epoch_lead "epoch NCHW" "$OUT_DIR/epoch_time_nchw.json" "$T_EPOCH_NCHW" \
    --k 9 --channels-last off --variants "stacked_masked,stacked_masked_compile_graphs"
epoch_lead "epoch K=$EPOCH_WIDE_K" "$OUT_DIR/epoch_time_wide.json" "$T_EPOCH_WIDE" \
    --k "$EPOCH_WIDE_K" --variants "stacked_masked"

# ---------------------------------------------------------------------------------------------------
if [ ! -f "$EPOCH_JSON" ]; then
    echo; echo "==== projection ===="; echo "skipped: no epoch times"
    add "projection: skipped: no epoch times"
elif [ "$HAVE_YAML" != 1 ]; then
    echo; echo "==== projection ===="; echo "skipped: pyyaml missing (the named sets are YAML)"
    add "projection: skipped: pyyaml missing"
else
    run_part "projection" "$T_PROJECTION" "$SCRATCH/projection.log" \
        "$PY" benchmarks/projected_hours.py --epoch-json "$EPOCH_JSON" --json "$OUT_DIR/projected_hours.json"
    add "projection: $(status_of "$PART_RC")$([ "$HAVE_CUDA" = 1 ] || echo ' (from the CPU smoke times: not GPU figures)')"
    lines=$(grep '^projected ' "$SCRATCH/projection.log")
    if [ -n "$lines" ]; then
        while IFS= read -r l; do add "$l"; done <<<"$lines"
    fi
fi

# ---------------------------------------------------------------------------------------------------
{
    echo
    echo "==== device check summary ($(date -u '+%Y-%m-%d'), $((SECONDS - START)) s) ===="
    for l in "${SUMMARY[@]}"; do echo "$l"; done
    echo "==== end of summary (raw outputs: $OUT_DIR) ===="
} | tee "$OUT_DIR/summary.txt"
exec >&- 2>&-
wait "$TEE_PID" 2>/dev/null   # the log complete before the script returns
exit 0
