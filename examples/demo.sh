#!/usr/bin/env bash
# `make demo`: the daemon with simulated GPUs (config/demo/governor.toml), two toy jobs
# heating them (one cooperative on gpu0, one held by signals on gpu1), and `governor top`
# to watch the loop: the GPUs heat up, a rule trips, the jobs slow, then pause, the GPUs
# cool, the jobs resume. Ctrl-C, or closing the terminal, stops everything. Logs and
# traces: .governor-demo/
set -euo pipefail
cd "$(dirname "$0")/.."

BIN=${BIN:-.venv/bin}
export GOVERNOR_CONFIG=config/demo/governor.toml
STATE=.governor-demo
mkdir -p "$STATE"
rm -f "$STATE"/*.jsonl "$STATE"/*.log

daemon=""
launchers=()
top=""

# Wait until none of the pids is left, at most $1 seconds; false if one still is.
gone_within() {
    local tries=$(($1 * 20)) pid
    shift
    while [ "$tries" -gt 0 ]; do
        for pid in "$@"; do
            kill -0 "$pid" 2>/dev/null && break
            pid=""
        done
        [ -z "$pid" ] && return 0
        sleep 0.05
        tries=$((tries - 1))
    done
    return 1
}

stop_all() {
    # once: a second Ctrl-C or hangup must not cut the stopping short
    trap '' INT TERM HUP
    trap - EXIT
    # go on whatever fails: after a hangup even an echo to the terminal fails
    set +e
    # top first, so that it gives the terminal back (after a hangup it is already gone)
    if [ -n "$top" ]; then
        kill -TERM "$top" 2>/dev/null
        gone_within 2 "$top" || kill -KILL "$top" 2>/dev/null
    fi
    echo
    echo "demo: stopping the jobs and the daemon..."
    # a launcher unregisters its job (resuming it) before passing the signal on
    for pid in "${launchers[@]}"; do kill -TERM "$pid" 2>/dev/null; done
    gone_within 5 "${launchers[@]}"
    # the daemon releases whatever is still held (a launcher that could not reach it)
    if [ -n "$daemon" ]; then
        kill -TERM "$daemon" 2>/dev/null
        gone_within 5 "$daemon" || kill -KILL "$daemon" 2>/dev/null
    fi
    # a launcher still there waits on a job that ignored SIGTERM: the job leads its own
    # process group
    for pid in "${launchers[@]}"; do
        kill -0 "$pid" 2>/dev/null || continue
        for job in $(pgrep -P "$pid"); do
            kill -CONT -- "-$job" 2>/dev/null
            kill -KILL -- "-$job" 2>/dev/null
        done
        kill -KILL "$pid" 2>/dev/null
    done
    echo "demo: done; logs and traces are in $STATE/"
}
# a signal stops everything and ends the script (it must not go on starting jobs after a
# Ctrl-C during start-up); the end of the script stops everything too
trap 'stop_all; exit 130' INT
trap 'stop_all; exit 143' TERM
trap 'stop_all; exit 129' HUP
trap stop_all EXIT

if "$BIN/governor" status >/dev/null 2>&1; then
    echo "demo: a governor already answers on 127.0.0.1:9480 (another make demo?); stop it first" >&2
    trap - INT TERM HUP EXIT
    exit 1
fi

# setsid: Ctrl-C reaches only this script and `governor top`; stop_all stops the rest in
# order, jobs first.
setsid "$BIN/governor" run --config "$GOVERNOR_CONFIG" >"$STATE/daemon.log" 2>&1 &
daemon=$!
for _ in $(seq 100); do
    "$BIN/governor" status >/dev/null 2>&1 && break
    if ! kill -0 "$daemon" 2>/dev/null; then
        echo "demo: the daemon did not start:" >&2
        cat "$STATE/daemon.log" >&2
        exit 1
    fi
    sleep 0.1
done

setsid "$BIN/governor" launch --name coop-search --mode cooperative --device gpu0 -- \
    "$BIN/python" examples/coop_search.py --trace "$STATE/coop-search.jsonl" \
    >"$STATE/coop-search.log" 2>&1 &
launchers+=($!)
setsid "$BIN/governor" launch --name plain-search --mode signal --device gpu1 -- \
    "$BIN/python" examples/plain_search.py --trace "$STATE/plain-search.jsonl" \
    >"$STATE/plain-search.log" 2>&1 &
launchers+=($!)

# top in the background, reading keys from this script's terminal (a background command's
# stdin would otherwise be /dev/null), so that this script waits for it with `wait`, which
# a signal interrupts at once; bash runs no trap while a foreground command runs. When
# the terminal closes, top sees it hang up and ends, and so does this script, through
# stop_all.
"$BIN/governor" top <&0 &
top=$!
wait "$top" || true
top=""

