"""A saga: book a trip (flight, hotel, car), undo what was booked if a booking fails.

    python -m tenantflow.examples.trip

runs two trips on the embedded default (a worker in this process): one books everything,
the other's hotel is full, so its flight is cancelled and it ends ``compensated``.
"""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path

from rich.console import Console

from tenantflow import App, Client, RetryPolicy, Runtime, Settings, WorkflowContext
from tenantflow.errors import RunFailedError

app = App("trips")
console = Console()
BOOKED: dict[str, str] = {}  # the "suppliers": booking reference -> what it is


class NoVacancy(RuntimeError):
    """The hotel is full."""


@app.step
async def book_flight(trip: str) -> str:
    BOOKED[f"{trip}:flight"] = "flight"
    return f"{trip}:flight"


@app.step
async def cancel_flight(trip: str) -> None:
    BOOKED.pop(f"{trip}:flight", None)  # nothing booked is nothing to undo: a success


@app.step(retry=RetryPolicy(max_attempts=2, initial_interval=0.01))
async def book_hotel(trip: str, full: bool) -> str:
    if full:
        raise NoVacancy(f"no room for {trip}")
    BOOKED[f"{trip}:hotel"] = "hotel"
    return f"{trip}:hotel"


@app.step
async def cancel_hotel(trip: str) -> None:
    BOOKED.pop(f"{trip}:hotel", None)


@app.step
async def charge(trip: str) -> str:
    return f"{trip}:paid"  # the pivot: once paid, the trip goes ahead


@app.step
async def book_car(trip: str) -> str:
    BOOKED[f"{trip}:car"] = "car"
    return f"{trip}:car"


@app.workflow
async def book_trip(ctx: WorkflowContext, trip: str, hotel_full: bool = False) -> list[str]:
    async with ctx.saga() as saga:
        saga.compensate(cancel_flight, trip)  # registered first: a timeout is undone too
        flight = await book_flight(trip)
        saga.compensate(cancel_hotel, trip)
        hotel = await book_hotel(trip, hotel_full)
        await saga.pivot(charge, trip)
        car = await book_car(trip)  # past the pivot: forward only
    return [flight, hotel, car]


def say(text: str) -> None:
    console.print(text, markup=False, highlight=False, soft_wrap=True)


async def main() -> None:
    from tenantflow.worker.worker import Worker

    with tempfile.TemporaryDirectory() as home:
        runtime = Runtime(Settings(home=Path(home)))
        runtime.registry.create("travel")
        tenant = Client(app, runtime=runtime).tenant("travel")
        worker = Worker(app, runtime)
        working = asyncio.create_task(worker.run())
        try:
            happy = await tenant.start(book_trip, "rome")
            unlucky = await tenant.start(book_trip, "oslo", hotel_full=True)
            say(f"rome: {await happy.result(timeout=30)}")
            try:
                await unlucky.result(timeout=30)
            except RunFailedError as failed:
                steps = [f"{s.name}:{s.status.value}" for s in await unlucky.steps()]
                say(f"oslo: {failed.status}; steps {steps}")
            say(f"still booked: {sorted(BOOKED)}")
        finally:
            worker.stop()
            await working
            await runtime.close()


if __name__ == "__main__":
    asyncio.run(main())
