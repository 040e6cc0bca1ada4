"""OpenTelemetry tracing of invocations: one node's tracer, its exporter and the W3C carriers.

Tracing is off by default, and then every hook in the runtime, router and host API is one
``if tracer is not None`` check: nothing here is imported, no span object is built. When on
(``tracing.enabled``), :func:`open_tracing` builds a private ``TracerProvider`` per node (not
the process-global one: several embedded nodes in one process each name themselves in
``service.instance.id``) with the configured exporter.

Spans of one invocation, parent first (docs/observability.md, "Tracing"):

* ``spawnmesh.invoke`` (SERVER) where it enters the node from outside a turn: an SDK ref, the
  ops HTTP invoke route, the host API's Invoke; a ``traceparent`` in the invocation's metadata
  (or the gRPC metadata of Invoke) makes it a child of the caller's trace;
* ``spawnmesh.peer.<kind>`` (CLIENT) around each peer-wire request; its context travels in the
  ``trace`` field of the peer ``Request``;
* ``spawnmesh.peer.handle`` (SERVER) on the receiving node, a child of that client span;
* ``spawnmesh.turn`` (INTERNAL) around each actor turn, wherever it runs;
* ``spawnmesh.host.turn`` (CLIENT) around a host actor's turn; its ``traceparent`` goes to the
  host in the turn's context metadata (Connect streams) and in the gRPC metadata (HandleTurn).

OpenTelemetry keeps the current span in a ``contextvars.ContextVar``; trio gives every task a
copy of its parent's context, so spans nest across ``await`` and into spawned tasks.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from typing import IO, TYPE_CHECKING, Any, Final

from spawnmesh.errors import ConfigError

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter
    from opentelemetry.trace import Span, SpanKind, Tracer

    from spawnmesh.config import TracingConfig

__all__ = [
    "TRACE_KEYS",
    "JsonLinesExporter",
    "Tracing",
    "open_tracing",
    "span_record",
    "trace_carrier",
]

log = logging.getLogger("spawnmesh.tracing")

TRACE_KEYS: Final = ("traceparent", "tracestate")
"""The W3C trace-context keys carried in the peer envelope and in metadata."""


class Tracing:
    """The tracer of one node. Create it with :func:`open_tracing`; :meth:`shutdown` flushes."""

    def __init__(self, provider: TracerProvider, exporter: SpanExporter, node: str) -> None:
        from opentelemetry import trace
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self.provider = provider
        self.exporter = exporter
        """The exporter (``InMemorySpanExporter`` with ``exporter = memory``: tests read it)."""
        self.node = node
        self.tracer: Tracer = provider.get_tracer("spawnmesh")
        self._kinds = trace.SpanKind
        self._propagator = TraceContextTextMapPropagator()
        self._get_current_span = trace.get_current_span

    def span(
        self,
        name: str,
        kind: str = "internal",
        attributes: Mapping[str, str | int | float | bool] | None = None,
        carrier: Mapping[str, str] | None = None,
    ) -> AbstractContextManager[Span]:
        """Start span ``name`` as the current span for the ``with`` block; ``kind`` is
        ``server``, ``client`` or ``internal``; ``carrier`` (W3C keys) names a remote parent,
        else the current span is the parent. An exception escaping the block is recorded
        and sets the span's status to error."""
        parent: Context | None = None
        if carrier:
            parent = self._propagator.extract(carrier)
        attrs: dict[str, str | int | float | bool] = {"spawnmesh.node": self.node}
        if attributes:
            attrs.update(attributes)
        return self.tracer.start_as_current_span(
            name, context=parent, kind=self._kind(kind), attributes=attrs
        )

    def _kind(self, kind: str) -> SpanKind:
        k = self._kinds
        return {"server": k.SERVER, "client": k.CLIENT}.get(kind, k.INTERNAL)

    def carrier(self) -> dict[str, str]:
        """The current span's context as W3C headers (empty if there is no recording span)."""
        out: dict[str, str] = {}
        if self._get_current_span().get_span_context().is_valid:
            self._propagator.inject(out)
        return out

    def shutdown(self) -> None:
        """Export what is buffered and stop the provider (idempotent)."""
        try:
            self.provider.force_flush(5000)
            self.provider.shutdown()
        except Exception:  # an exporter failing at exit must not fail the node's shutdown
            log.exception("tracing: shutdown failed")


def trace_carrier(metadata: Mapping[str, str] | None) -> dict[str, str] | None:
    """The W3C keys of ``metadata`` (None if it has no ``traceparent``)."""
    if not metadata or "traceparent" not in metadata:
        return None
    return {k: metadata[k] for k in TRACE_KEYS if k in metadata}


def span_record(span: ReadableSpan) -> dict[str, Any]:
    """One finished span as a JSON-able dict (the file exporter's line, and tests' view)."""
    ctx = span.context
    parent = span.parent
    status = span.status
    return {
        "name": span.name,
        "kind": span.kind.name.lower(),
        "trace_id": format(ctx.trace_id, "032x") if ctx is not None else "",
        "span_id": format(ctx.span_id, "016x") if ctx is not None else "",
        "parent_id": format(parent.span_id, "016x") if parent is not None else "",
        "remote_parent": bool(parent is not None and parent.is_remote),
        "start_ns": span.start_time,
        "end_ns": span.end_time,
        "status": status.status_code.name.lower(),
        "attributes": dict(span.attributes or {}),
        "service": dict(span.resource.attributes).get("service.instance.id", ""),
    }


class JsonLinesExporter:
    """Appends one JSON object per span and line to a file (``exporter = file``): readable
    without a collector, and what the two-process tracing test reads. Writes are serialized
    and flushed per batch, so several processes can share one file (``O_APPEND``)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._file: IO[str] | None = open(path, "a", encoding="utf-8")  # noqa: SIM115

    def export(self, spans: Sequence[ReadableSpan]) -> Any:
        from opentelemetry.sdk.trace.export import SpanExportResult

        lines = "".join(json.dumps(span_record(s), default=str) + "\n" for s in spans)
        with self._lock:
            if self._file is None:
                return SpanExportResult.FAILURE
            self._file.write(lines)
            self._file.flush()
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True


def open_tracing(config: TracingConfig, node: str) -> Tracing | None:
    """The node's :class:`Tracing` when ``config.enabled``, else None (the hooks' off switch).
    Raises ConfigError when the OpenTelemetry SDK is not installed."""
    if not config.enabled:
        return None
    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import (
            BatchSpanProcessor,
            ConsoleSpanExporter,
            SimpleSpanProcessor,
        )
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import (
            InMemorySpanExporter,
        )
        from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
    except ImportError as exc:
        raise ConfigError(
            "tracing.enabled",
            f"OpenTelemetry is not installed ({exc}); pip install 'spawnmesh[tracing]'",
        ) from None
    resource = Resource.create(
        {"service.name": config.service_name, "service.instance.id": node}
    )
    provider = TracerProvider(
        resource=resource, sampler=ParentBased(TraceIdRatioBased(config.sample_ratio))
    )
    exporter: Any
    if config.exporter == "otlp":
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        except ImportError as exc:
            raise ConfigError(
                "tracing.exporter",
                f"the OTLP exporter is not installed ({exc}); pip install 'spawnmesh[tracing]'",
            ) from None
        exporter = OTLPSpanExporter(endpoint=config.endpoint)
        provider.add_span_processor(BatchSpanProcessor(exporter))
    else:
        if config.exporter == "file":
            exporter = JsonLinesExporter(config.file)
        elif config.exporter == "console":
            exporter = ConsoleSpanExporter(service_name=config.service_name)
        else:
            exporter = InMemorySpanExporter()
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    log.info("tracing on: %s exporter%s", config.exporter,
             f" to {config.endpoint}" if config.exporter == "otlp" else "")
    return Tracing(provider, exporter, node)

