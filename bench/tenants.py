"""Provisioning at scale on PostgreSQL: the time to create one tenant (a database copied from
the migrated template), and to run ``migrate_all`` over N tenant databases already at head.

    python -m bench.tenants [--tenants 1000] [--parallel 8]

Creates and drops its own databases on the PostgreSQL of this machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from tenantflow import Runtime
from tenantflow.store.schema import HEAD_REVISION


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tenants", type=int, default=1000)
    parser.add_argument("--parallel", type=int, default=8)
    args = parser.parse_args()
    from tests.conftest import cleanup_production, production_settings

    with tempfile.TemporaryDirectory() as folder:
        settings = production_settings(
            Path(folder), log_level="WARNING", tenant_template=None
        )  # a fresh template, timed too
        runtime = Runtime(settings)
        try:
            started = time.perf_counter()
            runtime.registry.create("t0")  # creates and migrates the template first
            first = time.perf_counter() - started
            creates = []
            for i in range(1, args.tenants):
                t = time.perf_counter()
                runtime.registry.create(f"t{i}")
                creates.append(time.perf_counter() - t)
            t = time.perf_counter()
            report = runtime.registry.migrate_all(parallel=args.parallel)
            migrate_seconds = time.perf_counter() - t
            assert len(report.at_head) == args.tenants and not report.failed, report.failed
            quantiles = statistics.quantiles(creates, n=100, method="inclusive")
            print(
                json.dumps(
                    {
                        "tenants": args.tenants,
                        "head": HEAD_REVISION,
                        "first_tenant_with_template_s": round(first, 3),
                        "create_p50_s": round(quantiles[49], 3),
                        "create_p99_s": round(quantiles[98], 3),
                        "create_max_s": round(max(creates), 3),
                        "migrate_all_at_head_s": round(migrate_seconds, 2),
                        "parallel": args.parallel,
                    },
                    indent=2,
                )
            )
        finally:
            runtime.registry.close()
            cleanup_production(settings)


if __name__ == "__main__":
    main()
