#!/usr/bin/env bash
# The full 3.3B π0 (random weights, 257,152-token vocabulary, 1 camera) through edge-vla's export and
# onnxruntime, one process per step, each under /usr/bin/time -v and a watchdog (docs/PI0.md).
#
#   benchmarks/pi0_full_size.sh [WORK]      # default runs/pi0_full; needs ~40 GB of disk at the peak
#
# Env: PI0_FULL_CORE (default 1: the core to pin to), OMP_NUM_THREADS (default 1), PI0_FULL_STEPS (default
# "checkpoint export costs ort profile clean"), PI0_FULL_RSS_GIB (default 15: kill a step whose anonymous RSS
# passes it), PI0_FULL_MIN_AVAIL_GIB (default 2.5: kill it when the machine's MemAvailable drops under it).
# The watchdog reads RssAnon, not VmRSS: weights that onnxruntime or safetensors map from a file count in VmRSS
# but are page cache the kernel can drop; MemAvailable guards the rest of the machine either way.
# Results: WORK/summary.txt (one line per step) and WORK/logs/STEP.{log,time}.
set -uo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-runs/pi0_full}
CORE=${PI0_FULL_CORE:-1}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} OMP_WAIT_POLICY=PASSIVE TMPDIR
STEPS=${PI0_FULL_STEPS:-checkpoint export costs ort profile clean}
RSS_LIMIT_KB=$(awk "BEGIN{print int(${PI0_FULL_RSS_GIB:-15} * 1048576)}")
AVAIL_MIN_KB=$(awk "BEGIN{print int(${PI0_FULL_MIN_AVAIL_GIB:-2.5} * 1048576)}")
PY=${PY:-.venv/bin/python}
mkdir -p "$WORK/logs" "$WORK/tmp"
TMPDIR=$(realpath "$WORK/tmp")  # the exporter's work directory: same disk as WORK, cleaned with it

guarded() {  # NAME CMD...
    local name=$1; shift
    local log="$WORK/logs/$name" t0 rc cpid="" peak_anon=0 peak_rss=0 min_avail=999999999 killed=""
    t0=$(date +%s.%N)
    /usr/bin/time -v -o "$log.time" taskset -c "$CORE" "$@" >"$log.log" 2>&1 &
    local tpid=$!
    while kill -0 "$tpid" 2>/dev/null; do
        [ -z "$cpid" ] && cpid=$(pgrep -P "$tpid" | head -1)
        local avail anon=0 rss=0
        avail=$(awk '/^MemAvailable/{print $2}' /proc/meminfo)
        if [ -n "$cpid" ] && [ -r "/proc/$cpid/status" ]; then
            anon=$(awk '/^RssAnon/{print $2}' "/proc/$cpid/status" 2>/dev/null || echo 0)
            rss=$(awk '/^VmRSS/{print $2}' "/proc/$cpid/status" 2>/dev/null || echo 0)
        fi
        anon=${anon:-0}; rss=${rss:-0}
        (( anon > peak_anon )) && peak_anon=$anon
        (( rss > peak_rss )) && peak_rss=$rss
        (( avail < min_avail )) && min_avail=$avail
        if [ -n "$cpid" ] && { (( anon > RSS_LIMIT_KB )) || (( avail < AVAIL_MIN_KB )); }; then
            killed="killed: RssAnon ${anon} kB, MemAvailable ${avail} kB"
            kill -9 "$cpid" 2>/dev/null
        fi
        sleep 0.5
    done
    wait "$tpid"; rc=$?
    local line
    line=$(printf '%s rc=%s wall_s=%.1f max_rss_gib(time -v)=%.2f peak_rss_anon_gib=%.2f peak_vmrss_gib=%.2f min_memavailable_gib=%.2f %s' \
        "$name" "$rc" "$(echo "$(date +%s.%N) - $t0" | bc)" \
        "$(awk '/Maximum resident/{print $6/1048576}' "$log.time")" \
        "$(echo "$peak_anon/1048576" | bc -l)" "$(echo "$peak_rss/1048576" | bc -l)" \
        "$(echo "$min_avail/1048576" | bc -l)" "$killed")
    echo "$line" | tee -a "$WORK/summary.txt"
    grep '^RESULT ' "$log.log" | tee -a "$WORK/summary.txt"
    return "$rc"
}

for step in $STEPS; do
    case $step in
        checkpoint) guarded checkpoint "$PY" benchmarks/pi0_full_size.py checkpoint "$WORK" || exit 1 ;;
        export) guarded export "$PY" -m edge_vla.cli export "$WORK/ckpt" -o "$WORK/bundle" --external-data \
                    --skip-numerics --overwrite || exit 1
                du -sb "$WORK/bundle/graphs"/* | tee -a "$WORK/summary.txt" ;;
        costs) guarded costs "$PY" benchmarks/pi0_full_size.py costs "$WORK" ;;
        ort) guarded ort "$PY" benchmarks/pi0_full_size.py ort "$WORK" ;;
        profile) guarded profile "$PY" -m edge_vla.cli profile "$WORK/bundle" --iterations 2 --warmup 0 --steps 10 \
                     --threads "$OMP_NUM_THREADS" --backend onnxruntime --no-plot --out "$WORK/profile" ;;
        clean) rm -rf "$WORK/ckpt" "$WORK/bundle" "$WORK/tmp" "$WORK/profile"; echo "cleaned $WORK (kept logs, summary)" ;;
        *) echo "unknown step $step" >&2; exit 2 ;;
    esac
done
