#!/usr/bin/env python3
"""What making a botocore S3 client costs, with botocore's stock model loader and with the one
``snapfs.store.s3`` uses (which knows S3 is the only service, so it lists no service
directories). Every S3 command and every mount on S3 makes one client at start-up.

    .venv/bin/python bench/micro_s3_client.py [--pairs 16] [--out FILE]

Each pair makes a client in a new botocore session (nothing cached) with each loader, in
alternating order; prints and writes (``--out``) the medians of the CPU time it took (this
thread's: on a loaded machine wall time is mostly waiting for a core), their ratio, and the
load average. No network: the client is made, never used (endpoint 127.0.0.1:9).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import botocore.loaders
import botocore.session
from botocore.config import Config

from snapfs.store.s3 import _S3Loader


def make_client(loader: type[botocore.loaders.Loader] | None) -> float:
    session = botocore.session.get_session()
    if loader is not None:
        paths = session.get_config_variable("data_path")
        session.register_component("data_loader", loader(
            extra_search_paths=paths.split(os.pathsep) if paths else None))
    started = time.thread_time()
    session.create_client("s3", endpoint_url="http://127.0.0.1:9", region_name="us-east-1",
                          aws_access_key_id="bench", aws_secret_access_key="bench",
                          config=Config(s3={"addressing_style": "path"}))
    return time.thread_time() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=16)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    make_client(None)  # the first client also pays for imports botocore does lazily
    stock: list[float] = []
    ours: list[float] = []
    for i in range(args.pairs):
        order = [(stock, None), (ours, _S3Loader)]
        for into, loader in order if i % 2 == 0 else reversed(order):
            into.append(make_client(loader))
    result = {
        "pairs": args.pairs,
        "loadavg": os.getloadavg(),
        "stock_loader_cpu_ms": round(statistics.median(stock) * 1000, 1),
        "snapfs_loader_cpu_ms": round(statistics.median(ours) * 1000, 1),
        "ratio": round(statistics.median(ours) / statistics.median(stock), 3),
    }
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
