"""The App: a registry of workflows and steps, and the decorators that fill it."""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Concatenate, Generic, ParamSpec, TypeVar, overload

from tenantflow.errors import ConfigError, WorkflowNotRegisteredError
from tenantflow.resilience.breaker import BreakerConfig
from tenantflow.resilience.bulkhead import BulkheadConfig
from tenantflow.sdk.options import RetryPolicy, StartOptions, StepOptions, WorkflowOptions
from tenantflow.serde import TypedCodec

if TYPE_CHECKING:
    from tenantflow.sdk.context import WorkflowContext

P = ParamSpec("P")
R = TypeVar("R")

WorkflowFn = Callable[Concatenate["WorkflowContext", P], Awaitable[R]]


class Workflow(Generic[P, R]):
    """A registered workflow. Start it with a tenant client: ``await tenant.start(wf, *args)``.

    The function receives a :class:`WorkflowContext` first, then its own arguments, which the
    type checker holds ``start`` to.
    """

    def __init__(self, fn: WorkflowFn[P, R], *, name: str, options: WorkflowOptions) -> None:
        self.fn = fn
        self.name = name
        self.workflow_options = options
        self.start_options = StartOptions()
        self.codec = TypedCodec(fn, skip_first=True)
        self.__doc__ = fn.__doc__

    def options(self, *, idempotency_key: str | None = None, priority: int = 0) -> Workflow[P, R]:
        """This workflow, bound to the options of one start."""
        bound: Workflow[P, R] = Workflow.__new__(Workflow)
        bound.__dict__.update(self.__dict__)
        bound.start_options = StartOptions(idempotency_key=idempotency_key, priority=priority)
        return bound

    def __repr__(self) -> str:
        return f"<Workflow {self.name}>"


class Step(Generic[P, R]):
    """A registered step. Called inside a workflow, its result is checkpointed; called outside
    one, it simply runs (without retries or a checkpoint)."""

    def __init__(self, fn: Callable[P, Any], *, name: str, options: StepOptions) -> None:
        self.fn = fn
        self.name = name
        self.options = options
        self.is_async = inspect.iscoroutinefunction(fn)
        self.codec = TypedCodec(fn)
        self.__doc__ = fn.__doc__

    async def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        from tenantflow.sdk.context import current_workflow

        ctx = current_workflow()
        if ctx is None:
            if self.is_async:
                result: R = await self.fn(*args, **kwargs)
                return result
            return self.fn(*args, **kwargs)  # type: ignore[no-any-return]
        return await ctx._run_step(self, args, kwargs)

    def __repr__(self) -> str:
        return f"<Step {self.name}>"


class App:
    """A set of workflows and steps. No global registry: pass the app to clients and workers.

    >>> app = App("shop")
    >>> @app.step
    ... async def reserve(sku: str) -> int: ...
    >>> @app.workflow
    ... async def order(ctx: WorkflowContext, sku: str) -> int:
    ...     return await reserve(sku)
    """

    def __init__(self, name: str = "tenantflow") -> None:
        self.name = name
        self.workflows: dict[str, Workflow[Any, Any]] = {}
        self.steps: dict[str, Step[Any, Any]] = {}
        self.breakers: dict[str, BreakerConfig] = {}
        self.bulkheads: dict[str, BulkheadConfig] = {}

    def bulkhead(self, name: str, config: BulkheadConfig | None = None) -> None:
        """Configure the bulkhead ``name`` (25 calls at once otherwise)."""
        self.bulkheads[name] = config or BulkheadConfig()

    def breaker(self, name: str, config: BreakerConfig | None = None) -> None:
        """Configure the circuit breaker ``name`` (Resilience4j's defaults otherwise); every
        worker serving this app applies it."""
        self.breakers[name] = config or BreakerConfig()

    # -- workflows -------------------------------------------------------------------------

    @overload
    def workflow(self, fn: WorkflowFn[P, R], /) -> Workflow[P, R]: ...

    @overload
    def workflow(
        self,
        *,
        name: str | None = None,
        timeout: float | None = None,
        max_recovery_attempts: int = 10,
    ) -> Callable[[WorkflowFn[P, R]], Workflow[P, R]]: ...

    def workflow(
        self,
        fn: Callable[..., Any] | None = None,
        *,
        name: str | None = None,
        timeout: float | None = None,
        max_recovery_attempts: int = 10,
    ) -> Workflow[Any, Any] | Callable[[WorkflowFn[Any, Any]], Workflow[Any, Any]]:
        """Register an async workflow function (bare, or with options)."""
        options = WorkflowOptions(timeout=timeout, max_recovery_attempts=max_recovery_attempts)

        def register(f: WorkflowFn[Any, Any]) -> Workflow[Any, Any]:
            if not inspect.iscoroutinefunction(f):
                raise ConfigError(
                    f"workflow {f.__qualname__} must be an async function "
                    "(plain functions can be steps, which run in a thread)"
                )
            wf = Workflow(f, name=name or f.__qualname__, options=options)
            self._add(self.workflows, wf.name, wf)
            return wf

        return register(fn) if fn is not None else register

    # -- steps -------------------------------------------------------------------------------

    @overload
    def step(self, fn: Callable[P, Awaitable[R]], /) -> Step[P, R]: ...

    @overload
    def step(self, fn: Callable[P, R], /) -> Step[P, R]: ...

    @overload
    def step(
        self,
        *,
        name: str | None = None,
        retry: RetryPolicy | None = None,
        timeout: float | None = None,
        breaker: str | None = None,
        breaker_per_tenant: bool = False,
        bulkhead: str | None = None,
    ) -> _StepDecorator: ...

    def step(
        self,
        fn: Callable[..., Any] | None = None,
        *,
        name: str | None = None,
        retry: RetryPolicy | None = None,
        timeout: float | None = None,
        breaker: str | None = None,
        breaker_per_tenant: bool = False,
        bulkhead: str | None = None,
    ) -> Step[Any, Any] | _StepDecorator:
        """Register a step: an async function, or a plain one (which runs in a thread).

        With ``breaker="payments"`` the step's calls go through that circuit breaker: while it
        is open the run waits durably and tries again when a probe may pass, without using
        up the step's retries. With ``bulkhead="db"`` at most that bulkhead's number of
        calls run at once, across all workers (see ``docs/resilience.md``)."""
        options = StepOptions(
            retry=retry or RetryPolicy(),
            timeout=timeout,
            breaker=breaker,
            breaker_per_tenant=breaker_per_tenant,
            bulkhead=bulkhead,
        )
        decorator = _StepDecorator(self, name, options)
        return decorator(fn) if fn is not None else decorator

    # -- lookup ------------------------------------------------------------------------------

    def get_workflow(self, name: str) -> Workflow[Any, Any]:
        """The workflow registered as ``name`` (``WorkflowNotRegisteredError`` if none)."""
        try:
            return self.workflows[name]
        except KeyError:
            raise WorkflowNotRegisteredError(
                f"no workflow {name!r} is registered in app {self.name!r}"
            ) from None

    @staticmethod
    def _add(table: dict[str, Any], name: str, item: Any) -> None:
        if name in table:
            raise ConfigError(f"{name!r} is registered twice")
        table[name] = item


@dataclasses.dataclass(frozen=True)
class _StepDecorator:
    app: App
    name: str | None
    options: StepOptions

    @overload
    def __call__(self, fn: Callable[P, Awaitable[R]], /) -> Step[P, R]: ...

    @overload
    def __call__(self, fn: Callable[P, R], /) -> Step[P, R]: ...

    def __call__(self, fn: Callable[P, Any], /) -> Step[P, Any]:
        step: Step[P, Any] = Step(fn, name=self.name or fn.__qualname__, options=self.options)
        self.app._add(self.app.steps, step.name, step)
        return step
