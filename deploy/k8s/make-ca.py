#!/usr/bin/env python3
"""Write the credproxy interception CA for Kubernetes: the three files of the credproxy-ca
Secret, in mitmproxy's on-disk format.

    python deploy/k8s/make-ca.py OUT_DIR [--common-name NAME]
    kubectl -n NAMESPACE create secret generic credproxy-ca \\
        --from-file=OUT_DIR/mitmproxy-ca.pem \\
        --from-file=OUT_DIR/mitmproxy-ca-cert.pem \\
        --from-file=OUT_DIR/mitmproxy-dhparam.pem

- ``mitmproxy-ca.pem``: private key + certificate (secret: it can sign a certificate for
  any host every agent pod trusts);
- ``mitmproxy-ca-cert.pem``: the certificate alone (public: what agents trust);
- ``mitmproxy-dhparam.pem``: mitmproxy's fixed DH parameters (public), shipped so mitmproxy
  never needs to write into the CA directory.

Run it with the credproxy package installed (``./run.sh setup`` then ``.venv/bin/python``).
It refuses to overwrite existing files. Create the CA once per environment and keep the key
in your secret store: every agent pod must trust one CA, so it is never made per pod.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mitmproxy.certs import DEFAULT_DHPARAM

try:
    from proxy.ca import CA_FILE, CERT_FILE, ensure_ca
except ModuleNotFoundError:  # run from a checkout without the package installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from proxy.ca import CA_FILE, CERT_FILE, ensure_ca

DHPARAM_FILE = "mitmproxy-dhparam.pem"


def make_ca(out_dir: Path, common_name: str) -> list[Path]:
    files = [out_dir / CA_FILE, out_dir / CERT_FILE, out_dir / DHPARAM_FILE]
    existing = [str(f) for f in files if f.exists()]
    if existing:
        raise FileExistsError(f"refusing to overwrite {', '.join(existing)}")
    ensure_ca(out_dir, common_name=common_name)
    (out_dir / DHPARAM_FILE).write_bytes(DEFAULT_DHPARAM)
    return files


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out_dir", type=Path)
    p.add_argument("--common-name", default="credproxy CA")
    args = p.parse_args(argv)
    try:
        for f in make_ca(args.out_dir, args.common_name):
            print(f)
    except FileExistsError as exc:
        print(f"make-ca: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
