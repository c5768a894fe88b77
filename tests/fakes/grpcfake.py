"""What the fake gRPC servers share: a server on a free loopback port, generic method handlers
built from the client packages' own request/response types, request recording and error
injection."""

from __future__ import annotations

import threading
from collections import defaultdict, deque
from collections.abc import Callable
from concurrent import futures
from typing import Any

import grpc

Handler = Callable[[Any, grpc.ServicerContext], Any]


class FakeGrpcServer:
    def __init__(self) -> None:
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.lock = threading.RLock()
        # (method, request) for every call that reached the server, errors included.
        self.requests: list[tuple[str, Any]] = []
        self._errors: dict[str, deque[tuple[grpc.StatusCode, str, bool]]] = defaultdict(deque)

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    def add_service(
        self, service: str, methods: dict[str, tuple[Handler, Callable[[bytes], Any], Any]]
    ) -> None:
        """`methods`: name -> (handler, request deserializer, response serializer)."""
        handlers = {
            name: grpc.unary_unary_rpc_method_handler(
                self._wrap(name, fn),
                request_deserializer=deserialize,
                response_serializer=serialize,
            )
            for name, (fn, deserialize, serialize) in methods.items()
        }
        self.server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(service, handlers),)
        )

    def fail(
        self,
        method: str,
        code: grpc.StatusCode,
        message: str = "injected",
        times: int = 1,
        *,
        after_handling: bool = False,
    ) -> None:
        """The next `times` calls of `method` (e.g. "RunJob") answer `code` instead;
        `after_handling`: the call takes effect and only its answer is lost (a timeout after
        the server acted)."""
        with self.lock:
            self._errors[method].extend([(code, message, after_handling)] * times)

    def calls(self, method: str) -> list[Any]:
        with self.lock:
            return [req for name, req in self.requests if name == method]

    def _wrap(self, name: str, fn: Handler) -> Handler:
        def handle(request: Any, context: grpc.ServicerContext) -> Any:
            with self.lock:
                self.requests.append((name, request))
                injected = self._errors[name].popleft() if self._errors[name] else None
            if injected is None:
                return fn(request, context)
            code, message, after_handling = injected
            if after_handling:
                fn(request, context)
            context.abort(code, message)

        return handle

    def start(self) -> None:
        self.server.start()

    def stop(self) -> None:
        self.server.stop(grace=None).wait()
