#!/usr/bin/env bash
# Run a named preset on Flower's deployment runtime on this machine: a SuperLink and one
# SuperNode per client on loopback, TLS and SuperNode authentication on, then stop every
# process that was started, by pid.
#   scripts/deploy_local.sh deploy_fedavg
#   scripts/deploy_local.sh deploy_fedld num_rounds=10
#   scripts/deploy_local.sh deploy_fedavg backend.insecure=true   # no TLS, only when asked
# Certificates, node keys, logs and the processes' pids go to <output_dir>/deployment/.
set -euo pipefail
if [[ $# -lt 1 || "$1" == -* ]]; then
  echo "usage: $0 <preset in conf/experiment> [hydra overrides...]" >&2
  exit 2
fi
preset="$1"; shift
cd "$(dirname "$0")/.."
fedsim_cmd=(fedsim)
[[ -x .venv/bin/fedsim ]] && fedsim_cmd=(.venv/bin/fedsim)
out="outputs/deploy/${preset}-$(date +%Y%m%d-%H%M%S)"
pids="$out/deployment/pids"
flwr_home="$(realpath -m "$out")/deployment/flwr-home"  # in the environment of each process

# fedsim stops its processes itself (also on Ctrl-C, SIGTERM and SIGHUP) and then ends the
# pids file with "# stopped". Only if fedsim was killed outright is that line missing: then
# each listed pid that is still a Flower process of this run is stopped with its children.
cleanup() {
  [[ -f "$pids" ]] || return 0
  grep -qx "# stopped" "$pids" && return 0
  while read -r pid name; do
    [[ "$pid" =~ ^[0-9]+$ ]] || continue
    grep -qsa "FLWR_HOME=$flwr_home" "/proc/$pid/environ" || continue
    echo "stopping leftover $name (pid $pid)" >&2
    pkill -TERM -P "$pid" 2>/dev/null || true
    kill -TERM "$pid" 2>/dev/null || true
  done < "$pids"
}
trap cleanup EXIT

"${fedsim_cmd[@]}" "+experiment=$preset" backend=deployment "output_dir=$out" "$@"
