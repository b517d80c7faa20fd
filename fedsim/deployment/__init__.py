"""Flower's deployment runtime driven from fedsim: TLS files, SuperNode keys, a local
federation on loopback, and run submission with `flwr run`.

Everything here starts Flower's own executables (`flower-superlink`,
`flower-supernode`, `flwr`) as subprocesses; fedsim adds no transport of its own.

- `certificates`: a self-signed CA and server certificate (TLS), SuperNode key pairs.
- `flwr_cli`: Flower's executables and environment, the `flwr` CLI against a
  `FLWR_HOME` (its connection config, JSON answers), and `flwr run` of the app bundle.
- `federation`: a SuperLink and SuperNodes on loopback, started, waited for, and
  stopped by pid (the pids file); any one of them killed and restarted (faults).
- `signals`: Ctrl-C, SIGTERM and SIGHUP held while processes start or stop.
- `errors`: `DeploymentError`, raised by all of them.
"""
