"""Make SuperNode authentication keys: one EC key pair per node.

    python scripts/make_node_keys.py --out node-keys --count 3

Each node keeps its private key (flower-supernode --auth-supernode-private-key
node-keys/node-0); the SuperLink owner registers each public key with
`flwr supernode register node-keys/node-0.pub <superlink>` on a SuperLink started
with --enable-supernode-auth. Unregistered keys are refused.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fedsim.deployment.certificates import make_node_key


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("node-keys"))
    parser.add_argument("--count", type=int, default=2, help="how many nodes")
    parser.add_argument("--prefix", default="node", help="key names: <prefix>-<i>")
    args = parser.parse_args()
    if args.count < 1:
        parser.error(f"--count must be >= 1 (got {args.count})")
    names = [f"{args.prefix}-{i}" for i in range(args.count)]
    taken = [name for name in names if (args.out / name).exists()]
    if taken:
        parser.error(f"{args.out} already holds keys {taken}; fedsim does not overwrite keys")
    for name in names:
        key = make_node_key(args.out, name)
        print(f"{key.private}  (stays on the node)   {key.public}  (register this one)")


if __name__ == "__main__":
    main()
