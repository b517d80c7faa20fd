#!/usr/bin/env bash
# Run a named preset on Flower's deployment runtime on this machine: a SuperLink and one
# SuperNode per client on loopback, TLS and SuperNode authentication on, then stop every
# process that was started, by pid.
#   scripts/deploy_local.sh deploy_fedavg
#   scripts/deploy_local.sh deploy_fedld num_rounds=10
#   scripts/deploy_local.sh deploy_fedavg backend.insecure=true   # no TLS, only when asked
# Certificates, node keys, logs and the processes' pids go to <output_dir>/deployment/.
set -uo pipefail
if [[ $# -lt 1 || "$1" == -* ]]; then
  echo "usage: $0 <preset in fedsim/conf/experiment> [hydra overrides...]" >&2
  exit 2
fi
preset="$1"; shift
cd "$(dirname "$0")/.."
fedsim_cmd=(fedsim)
[[ -x .venv/bin/fedsim ]] && fedsim_cmd=(.venv/bin/fedsim)
out="outputs/deploy/${preset}-$(date +%Y%m%d-%H%M%S)"
pids="$out/deployment/pids"
flwr_home="$(realpath -m "$out")/deployment/flwr-home"  # in the environment of each process

# fedsim stops its processes itself (also on Ctrl-C, SIGTERM and SIGHUP, which this script
# forwards to it) and then ends the pids file with "# stopped". Only if fedsim was killed
# outright is that line missing: then every process whose environment names this run's
# FLWR_HOME exactly is stopped.
stop_leftovers() {
  [[ -f "$pids" ]] || return 0
  [[ "$(tail -n 1 "$pids")" == "# stopped" ]] && return 0
  for environ in /proc/[0-9]*/environ; do
    grep -qzxF "FLWR_HOME=$flwr_home" "$environ" 2>/dev/null || continue
    pid="${environ#/proc/}"; pid="${pid%/environ}"
    echo "stopping leftover process $pid" >&2
    kill -TERM "$pid" 2>/dev/null || true
  done
}
trap stop_leftovers EXIT

"${fedsim_cmd[@]}" "+experiment=$preset" backend=deployment "output_dir=$out" "$@" &
fedsim_pid=$!
trap 'kill -TERM "$fedsim_pid" 2>/dev/null' INT TERM HUP
status=0
while kill -0 "$fedsim_pid" 2>/dev/null; do  # `wait` returns early when a signal arrives
  wait "$fedsim_pid"
  status=$?
done
exit "$status"
