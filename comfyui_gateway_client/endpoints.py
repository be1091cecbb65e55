"""Binding the call descriptions (comfyui_gateway_client.calls) to a client: `get_job = blocking(calls.get_job)` on
GatewayClient is `client.get_job(job_id) -> Job`; `awaiting(calls.get_job)` on AsyncGatewayClient is the same
coroutine. Each keeps its call's signature and docstring, for editors and type checkers alike."""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from typing import Any, Generic, ParamSpec, TypeVar, overload

from comfyui_gateway_client.calls import Call

P = ParamSpec("P")
T = TypeVar("T")


class blocking(Generic[P, T]):  # noqa: N801 - used as a decorator-like field, spelt like one
    def __init__(self, describe: Callable[P, Call[T]]) -> None:
        self.describe = describe
        self.__doc__ = describe.__doc__

    @overload
    def __get__(self, client: None, owner: type) -> blocking[P, T]: ...
    @overload
    def __get__(self, client: object, owner: type) -> Callable[P, T]: ...

    def __get__(self, client: Any, owner: type) -> Any:
        if client is None:
            return self
        describe = self.describe

        @functools.wraps(describe)
        def send(*args: P.args, **kwargs: P.kwargs) -> T:
            return client._send(describe(*args, **kwargs))

        return send


class awaiting(Generic[P, T]):  # noqa: N801
    def __init__(self, describe: Callable[P, Call[T]]) -> None:
        self.describe = describe
        self.__doc__ = describe.__doc__

    @overload
    def __get__(self, client: None, owner: type) -> awaiting[P, T]: ...
    @overload
    def __get__(self, client: object, owner: type) -> Callable[P, Awaitable[T]]: ...

    def __get__(self, client: Any, owner: type) -> Any:
        if client is None:
            return self
        describe = self.describe

        @functools.wraps(describe)
        async def send(*args: P.args, **kwargs: P.kwargs) -> T:
            return await client._send(describe(*args, **kwargs))

        return send
