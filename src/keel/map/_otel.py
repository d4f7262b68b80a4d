"""Export recorded edges as OpenTelemetry spans (the ``keel[otel]`` extra).

Each request the tap sees becomes a span (CLIENT for calls, PRODUCER for casts, fanouts),
named ``topic/method``, carrying the calling service, pattern, version and outcome, in the
trace of the request's W3C traceparent, so an existing tracing backend shows the same edges
as `keel map`. Spans go to the global tracer provider the application configured;
exporting is best effort and never slows or fails a request beyond creating the span.
"""

from __future__ import annotations

import time
from typing import Any

from keel.errors import MissingExtra


class OtelExport:
    def __init__(self, tracer_provider: Any = None) -> None:
        try:
            from opentelemetry import trace  # noqa: PLC0415 - optional extra
            from opentelemetry.trace import (  # noqa: PLC0415
                NonRecordingSpan,
                SpanContext,
                SpanKind,
                TraceFlags,
            )
        except ImportError as exc:
            raise MissingExtra(
                "OpenTelemetry export needs the opentelemetry packages: pip install 'keel[otel]'",
                extra="otel",
            ) from exc
        self._trace = trace
        self._span_context = SpanContext
        self._non_recording = NonRecordingSpan
        self._flags = TraceFlags
        self._kinds = {
            "call": SpanKind.CLIENT,
            "cast": SpanKind.PRODUCER,
            "fanout": SpanKind.PRODUCER,
        }
        self._tracer = trace.get_tracer("keel.messaging", tracer_provider=tracer_provider)

    def span(
        self,
        *,
        caller: str,
        topic: str,
        method: str,
        pattern: str,
        version: str,
        outcome: str,
        seconds: float,
        traceparent: str,
    ) -> None:
        parts = traceparent.split("-")
        parent = None
        if len(parts) == 4:
            context = self._span_context(
                trace_id=int(parts[1], 16),
                span_id=int(parts[2], 16),
                is_remote=True,
                trace_flags=self._flags(int(parts[3], 16)),
            )
            parent = self._trace.set_span_in_context(self._non_recording(context))
        end = time.time_ns()
        span = self._tracer.start_span(
            f"{topic}/{method}",
            context=parent,
            kind=self._kinds.get(pattern, self._kinds["call"]),
            start_time=end - int(seconds * 1e9),
            attributes={
                "rpc.system": "keel",
                "rpc.service": topic,
                "rpc.method": method,
                "keel.pattern": pattern,
                "keel.caller": caller,
                "keel.version": version,
                "keel.outcome": outcome,
            },
        )
        span.end(end_time=end)
