# Pod limits for benchmarks: run a command alone in cgroup v1 groups (cpu, cpuacct,
# memory) with a CPU quota and a memory limit, as a kubelet sets a container's
# resources.limits, and report what the cgroup saw.
#
#   pod_run_limited LABEL CPU MEM_BYTES OUTFILE -- cmd...
#     CPU: cores as a decimal ("0.75"; "0" = no quota); MEM_BYTES: "0" = no limit.
#     OUTFILE gets one line: "<wall s> <cpu s> <cgroup mem peak bytes> <failcnt> <oom kills> <rc>".
# The memory peak is memory.max_usage_in_bytes, which counts page cache as a pod's does.
# Needs root and the v1 controllers under /sys/fs/cgroup (this machine has them).

pod_limits_available() {
    [ -w /sys/fs/cgroup/memory ] && [ -w /sys/fs/cgroup/cpu ] && [ -e /sys/fs/cgroup/cpu/cpu.cfs_quota_us ]
}

pod_run_limited() {
    local label=$1 cpu=$2 mem=$3 out=$4; shift 4
    [ "$1" = "--" ] && shift
    local name="ferrydisk-bench-$$-$label"
    local cg_cpu=/sys/fs/cgroup/cpu/$name cg_acct=/sys/fs/cgroup/cpuacct/$name cg_mem=/sys/fs/cgroup/memory/$name
    # (where cpu and cpuacct are co-mounted, both paths name the same group)
    mkdir -p "$cg_cpu" "$cg_acct" "$cg_mem"
    local period; period=$(cat "$cg_cpu/cpu.cfs_period_us")
    if [ "$cpu" != "0" ]; then
        awk -v c="$cpu" -v p="$period" 'BEGIN { printf "%d\n", c * p }' > "$cg_cpu/cpu.cfs_quota_us"
    fi
    [ "$mem" != "0" ] && echo "$mem" > "$cg_mem/memory.limit_in_bytes"
    sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null || true
    local start end rc=0
    start=$(date +%s.%N)
    CG_GROUPS="$cg_cpu $cg_acct $cg_mem" bash -c 'for g in $CG_GROUPS; do echo $$ > "$g/cgroup.procs"; done; exec "$@"' _ "$@" \
        > "$work/pod.$label.out" 2> "$work/pod.$label.err" || rc=$?
    end=$(date +%s.%N)
    local usage peak fail oom
    usage=$(cat "$cg_acct/cpuacct.usage")
    peak=$(cat "$cg_mem/memory.max_usage_in_bytes")
    fail=$(cat "$cg_mem/memory.failcnt")
    oom=$(awk '/^oom_kill /{print $2}' "$cg_mem/memory.oom_control"); oom=${oom:-0}
    awk -v s="$start" -v e="$end" -v u="$usage" -v p="$peak" -v f="$fail" -v o="$oom" -v r="$rc" \
        'BEGIN { printf "%.2f %.2f %d %d %d %d\n", e - s, u / 1e9, p, f, o, r }' > "$out"
    rmdir "$cg_cpu" "$cg_acct" "$cg_mem" 2>/dev/null || true
    return 0
}
