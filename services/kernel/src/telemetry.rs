//! Logs and traces.
//!
//! - JSON log lines (or text for a terminal) through `tracing`; spans carry
//!   IDs and codes, never payloads.
//! - OpenTelemetry: spans always get W3C trace IDs; they are exported over
//!   OTLP/gRPC when `OTEL_EXPORTER_OTLP_ENDPOINT` is set.
//! - Trace context travels from gRPC metadata (`traceparent`) into the span
//!   of the call, from there into every event's metadata and message headers,
//!   and back out into the span of whoever consumes the message.

use std::collections::HashMap;

use opentelemetry::propagation::{Extractor, TextMapPropagator as _};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::fmt::format::FmtSpan;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{EnvFilter, Layer as _};

use crate::settings::TelemetrySettings;
use crate::store::EventMetadata;

/// Flushes and stops trace export when dropped.
pub struct TelemetryGuard {
    provider: SdkTracerProvider,
}

/// Longest the last spans are given to reach the collector at exit (a
/// stop's own limit comes before it: `server::STOP_LIMIT`).
const EXPORT_AT_EXIT: std::time::Duration = std::time::Duration::from_secs(1);

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if let Err(err) = self.provider.shutdown_with_timeout(EXPORT_AT_EXIT) {
            eprintln!("telemetry shutdown: {err}");
        }
    }
}

/// Installs logging and tracing for the process, writing logs to stdout.
///
/// # Errors
/// When the OTLP exporter cannot be built or a subscriber is already installed.
pub fn init(service: &'static str, settings: &TelemetrySettings) -> Result<TelemetryGuard, anyhow::Error> {
    let guard = init_with_writer(service, settings, std::io::stdout)?;
    std::panic::set_hook(Box::new(log_panic));
    Ok(guard)
}

/// What a service logs of a panic: that it happened, and where. Never its
/// message, which may format what the code held (a name typed into a
/// request); Rust's default hook would print it to stderr, the journal.
/// Tests keep the default hook, to see their assertions.
fn log_panic(info: &std::panic::PanicHookInfo<'_>) {
    let location = info
        .location()
        .map_or_else(|| "unknown".to_owned(), |l| format!("{}:{}", l.file(), l.line()));
    tracing::error!(location, "a thread panicked (its message is not logged)");
}

/// Installs logging and tracing with logs going to `writer` (tests capture them).
///
/// Span closings are logged too, so every span's fields reach the log.
///
/// # Errors
/// When the OTLP exporter cannot be built or a subscriber is already installed.
pub fn init_with_writer<W>(
    service: &'static str,
    settings: &TelemetrySettings,
    writer: W,
) -> Result<TelemetryGuard, anyhow::Error>
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name(service)
        .build();
    let mut builder = SdkTracerProvider::builder().with_resource(resource);
    let otlp = std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT")
        .ok()
        .filter(|v| !v.is_empty());
    if otlp.is_some() {
        let exporter = opentelemetry_otlp::SpanExporter::builder().with_tonic().build()?;
        builder = builder.with_batch_exporter(exporter);
    }
    let provider = builder.build();
    opentelemetry::global::set_tracer_provider(provider.clone());
    let tracer = provider.tracer(service);

    // Logs follow the log filter; spans for tracing are kept at info whatever
    // the log level, so trace context flows even with logs turned down.
    let log_filter = EnvFilter::try_new(&settings.log)?;
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(writer)
        .with_span_events(FmtSpan::CLOSE)
        .with_target(true);
    let fmt = if settings.log_format == "text" {
        fmt.with_filter(log_filter).boxed()
    } else {
        fmt.json()
            .with_current_span(true)
            .with_span_list(true)
            .with_filter(log_filter)
            .boxed()
    };
    tracing_subscriber::registry()
        .with(fmt)
        .with(
            tracing_opentelemetry::layer()
                .with_tracer(tracer)
                .with_filter(EnvFilter::new("info")),
        )
        .try_init()?;
    tracing::info!(service, otlp_export = otlp.is_some(), "telemetry started");
    Ok(TelemetryGuard { provider })
}

struct HeaderExtractor<'a>(&'a http::HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

/// The span of one gRPC call, child of the caller's `traceparent` if any.
/// Used as tonic's `trace_fn`.
#[must_use]
pub fn grpc_span(request: &http::Request<()>) -> Span {
    // Only a known RPC is named: the path is the caller's text.
    let method = crate::gate::Path::label(request.uri().path());
    let span = tracing::info_span!("grpc", otel.name = %method, rpc.method = %method, otel.kind = "server");
    let parent = TraceContextPropagator::new().extract(&HeaderExtractor(request.headers()));
    let _ = span.set_parent(parent);
    span
}

/// The W3C `traceparent` and `tracestate` of the current span.
#[must_use]
pub fn current_trace_context() -> (Option<String>, Option<String>) {
    let mut carrier: HashMap<String, String> = HashMap::new();
    TraceContextPropagator::new().inject_context(&Span::current().context(), &mut carrier);
    (
        carrier.remove("traceparent").filter(|v| !v.is_empty()),
        carrier.remove("tracestate").filter(|v| !v.is_empty()),
    )
}

/// Makes `span` a child of the trace an event's metadata carries.
pub fn continue_trace(span: &Span, metadata: &EventMetadata) {
    let mut carrier: HashMap<String, String> = HashMap::new();
    if let Some(tp) = &metadata.traceparent {
        carrier.insert("traceparent".into(), tp.clone());
    }
    if let Some(ts) = &metadata.tracestate {
        carrier.insert("tracestate".into(), ts.clone());
    }
    let _ = span.set_parent(TraceContextPropagator::new().extract(&carrier));
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::sync::{Arc, Mutex};

    use super::*;

    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_panic_is_logged_without_its_message() {
        let captured = Captured::default();
        let writer = captured.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .finish();
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(log_panic));
        let outcome = tracing::subscriber::with_default(subscriber, || {
            std::panic::catch_unwind(|| panic!("no bed for Aigerim Bekova, passport AB0123456"))
        });
        std::panic::set_hook(default);
        assert!(outcome.is_err());
        let text = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
        assert!(text.contains("a thread panicked"), "{text}");
        assert!(text.contains("telemetry.rs"), "the location is logged: {text}");
        assert!(!text.contains("Aigerim") && !text.contains("AB0123456"), "{text}");
    }
}
