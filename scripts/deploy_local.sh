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

# fedsim stops its processes itself (also on Ctrl-C and SIGTERM); this trap covers the case
# where fedsim itself was killed outright: whatever is still listed in the pids file goes.
cleanup() {
  [[ -f "$pids" ]] || return 0
  while read -r pid _; do kill -TERM -- "-$pid" 2>/dev/null || true; done < "$pids"
}
trap cleanup EXIT

"${fedsim_cmd[@]}" "+experiment=$preset" backend=deployment "output_dir=$out" "$@"
