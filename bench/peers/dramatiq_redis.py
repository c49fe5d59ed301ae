"""Dramatiq on its Redis broker, in the peer protocol (see ``_common``): a no-op actor that
records its start.

Configuration: Dramatiq's defaults (default middleware, no result backend; a message is
acknowledged after the actor ran). The broker is Redis database 2, flushed before and after a run.
Workers: ``dramatiq bench.peers.dramatiq_redis --processes P --threads 8``.

CI does not install Dramatiq: its imports carry an ignore for the missing module, so the module
type-checks without it (its objects are then ``Any``) and against its hints where installed.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import cast

# dramatiq (both imports) is not installed in CI, which has the test extras only; where it is,
# it is typed (py.typed) and the ignores are unused.
import dramatiq  # type: ignore[import-not-found, unused-ignore]
from dramatiq.brokers.redis import RedisBroker  # type: ignore[import-not-found, unused-ignore]

from bench.peers import _common

BROKER_DB = 2
BROKER_URL = f"{_common.REDIS_URL.rsplit('/', 1)[0]}/{BROKER_DB}"

# Module level, so that the ``dramatiq`` worker command finds the broker and the actor.
# RedisBroker.__init__ carries no annotations: called through a typed cast.
broker = cast("Callable[..., RedisBroker]", RedisBroker)(url=BROKER_URL)
dramatiq.set_broker(broker)


def noop(run_uid: str, enqueued_at: float) -> None:
    _common.record(run_uid, enqueued_at)


actor = dramatiq.actor(actor_name="peerbench_noop", queue_name="peerbench")(noop)


def flush_broker() -> None:
    _common.flush_redis_db(BROKER_DB)


def main() -> None:
    args = _common.parse_args()
    flush_broker()  # leftovers of an interrupted run would be consumed during this one
    dramatiq_bin = str(Path(sys.executable).parent / "dramatiq")
    procs = _common.start_workers(
        [dramatiq_bin, "bench.peers.dramatiq_redis", "--processes", str(args.processes),
         "--threads", "8"],
        args.processes,
    )  # fmt: skip
    try:
        _common.wait_idle()

        def enqueue(run_uid: str, now: float) -> None:
            actor.send(run_uid, now)

        _common.measure("dramatiq", args, enqueue).print()
    finally:
        _common.stop_workers(procs)
        broker.close()
        flush_broker()


if __name__ == "__main__":
    main()
