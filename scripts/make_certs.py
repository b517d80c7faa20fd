"""Make a self-signed CA and a SuperLink server certificate for local or lab use.

    python scripts/make_certs.py --out certificates --host 127.0.0.1 --host superlink.lab

Start the SuperLink with --ssl-ca-certfile ca.crt --ssl-certfile server.pem
--ssl-keyfile server.key; give ca.crt to every SuperNode (--root-certificates) and
to `fedsim backend=deployment backend.root_certificates=...`. Every name or IP the
SuperNodes and `flwr` dial must be a --host. Not for production: use your CA there.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fedsim.deployment.certificates import LOOPBACK_HOSTS, make_tls_files


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("certificates"),
                        help="directory for ca.crt, server.pem, server.key")
    parser.add_argument("--host", action="append", default=None,
                        help="a name or IP the SuperLink is reached at (repeatable; "
                             f"default: {' '.join(LOOPBACK_HOSTS)})")
    parser.add_argument("--days", type=int, default=365, help="validity in days")
    args = parser.parse_args()
    if args.out.exists() and any(args.out.glob("*")):
        parser.error(f"--out {args.out} is not empty; fedsim does not overwrite certificates")
    files = make_tls_files(args.out, args.host or LOOPBACK_HOSTS, args.days)
    print(f"CA certificate:     {files.ca_cert}\nserver certificate: {files.server_cert}\n"
          f"server key:         {files.server_key}")


if __name__ == "__main__":
    main()
