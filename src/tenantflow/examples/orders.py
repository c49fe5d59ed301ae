"""Order fulfilment: the example workflow of ``tenantflow demo``.

Reserve stock, charge the customer through a flaky payment gateway (it fails now and then and
the step retries with backoff), wait durably for the warehouse's pick window, then ship. Every
external call gets the step's idempotency key, as a real payment or shipping API would want.
"""

from __future__ import annotations

import asyncio
import random

from pydantic import BaseModel

from tenantflow import App, RetryPolicy, WorkflowContext, current_step

app = App("orders")

# How often the simulated payment gateway fails; the demo sets it.
GATEWAY_FAILURE_RATE = 0.3
PICK_WINDOW_SECONDS = 1.0


class Order(BaseModel):
    order_id: str
    sku: str
    quantity: int
    amount_cents: int


class Receipt(BaseModel):
    order_id: str
    reservation: str
    charge: str
    tracking: str


class GatewayUnavailable(ConnectionError):
    """The payment gateway did not answer (simulated)."""


@app.step
async def reserve_stock(order: Order) -> str:
    await asyncio.sleep(0.01)  # the inventory service
    return f"res-{current_step().idempotency_key}"


CHARGE_ATTEMPTS = 6


@app.step(retry=RetryPolicy(max_attempts=CHARGE_ATTEMPTS, initial_interval=0.05, max_interval=1.0))
def charge_card(order: Order) -> str:
    """A plain function: it runs in a thread, like a blocking HTTP client would. The gateway
    answers the last attempt, so that every order of the example goes through."""
    last = current_step().attempt >= CHARGE_ATTEMPTS
    if not last and random.random() < GATEWAY_FAILURE_RATE:
        raise GatewayUnavailable("payment gateway timed out")
    return f"ch-{current_step().idempotency_key}"


@app.step
async def ship(order: Order, reservation: str) -> str:
    await asyncio.sleep(0.01)  # the shipping carrier's API
    return f"trk-{order.order_id}"


@app.workflow
async def fulfil_order(ctx: WorkflowContext, order: Order) -> Receipt:
    reservation = await reserve_stock(order)
    charge = await charge_card(order)
    await ctx.sleep(PICK_WINDOW_SECONDS)  # durable: the worker is free meanwhile
    tracking = await ship(order, reservation)
    return Receipt(
        order_id=order.order_id, reservation=reservation, charge=charge, tracking=tracking
    )
