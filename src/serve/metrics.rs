//! `GET /metrics`: the server's counters in the Prometheus text format
//! (`prometheus` crate, text exposition format 0.0.4).
//!
//! ```text
//! lazarus_serve_requests_total{model, status}         predict requests by answer status
//! lazarus_serve_request_duration_seconds{model}       predict latency, arrival to answer
//! lazarus_serve_batch_size{model}                     images per batch the model ran
//! lazarus_serve_queue_depth{model}                    images admitted and not yet predicted
//! lazarus_serve_images_total{model, features_from}    images predicted (cache or encoder)
//! lazarus_serve_audit_records_total                   records committed to the audit trail
//! lazarus_serve_audit_errors_total                    failed audit commits (retried)
//! ```
//!
//! Requests for a model the server does not have count under `model=""`, so
//! a client cannot grow the label set.

use prometheus::{
    HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

/// Seconds: 1 ms to about 33 s, doubling.
fn latency_buckets() -> Vec<f64> {
    prometheus::exponential_buckets(0.001, 2.0, 16).expect("valid buckets")
}

/// Batch sizes 1, 2, 4, ... 256.
fn batch_buckets() -> Vec<f64> {
    prometheus::exponential_buckets(1.0, 2.0, 9).expect("valid buckets")
}

/// Every metric the server exports, registered in one registry.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    pub requests: IntCounterVec,
    pub latency: HistogramVec,
    pub batch_size: HistogramVec,
    pub queue_depth: IntGaugeVec,
    pub images: IntCounterVec,
    pub audit_records: IntCounter,
    pub audit_errors: IntCounter,
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new(
                "lazarus_serve_requests_total",
                "Predict requests by model and answer status.",
            ),
            &["model", "status"],
        )
        .expect("valid metric");
        let latency = HistogramVec::new(
            HistogramOpts::new(
                "lazarus_serve_request_duration_seconds",
                "Predict latency from the request's arrival to its answer.",
            )
            .buckets(latency_buckets()),
            &["model"],
        )
        .expect("valid metric");
        let batch_size = HistogramVec::new(
            HistogramOpts::new(
                "lazarus_serve_batch_size",
                "Images per batch a model predicted together.",
            )
            .buckets(batch_buckets()),
            &["model"],
        )
        .expect("valid metric");
        let queue_depth = IntGaugeVec::new(
            Opts::new(
                "lazarus_serve_queue_depth",
                "Images admitted to a model's queue and not yet predicted.",
            ),
            &["model"],
        )
        .expect("valid metric");
        let images = IntCounterVec::new(
            Opts::new(
                "lazarus_serve_images_total",
                "Images predicted, by where their features came from.",
            ),
            &["model", "features_from"],
        )
        .expect("valid metric");
        let audit_records = IntCounter::new(
            "lazarus_serve_audit_records_total",
            "Inference records committed to the audit trail.",
        )
        .expect("valid metric");
        let audit_errors = IntCounter::new(
            "lazarus_serve_audit_errors_total",
            "Audit trail commits that failed (their records are retried).",
        )
        .expect("valid metric");
        for collector in [
            Box::new(requests.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(latency.clone()),
            Box::new(batch_size.clone()),
            Box::new(queue_depth.clone()),
            Box::new(images.clone()),
            Box::new(audit_records.clone()),
            Box::new(audit_errors.clone()),
        ] {
            registry
                .register(collector)
                .expect("metric names are unique");
        }
        Metrics {
            registry,
            requests,
            latency,
            batch_size,
            queue_depth,
            images,
            audit_records,
            audit_errors,
        }
    }

    /// Zeroes the series of a model, so every model shows up before its
    /// first request.
    pub fn add_model(&self, model: &str) {
        self.queue_depth.with_label_values(&[model]).set(0);
        self.latency.with_label_values(&[model]);
        self.batch_size.with_label_values(&[model]);
    }

    /// The exposition text and its content type.
    pub fn render(&self) -> (String, &'static str) {
        let encoder = TextEncoder::new();
        let mut text = String::new();
        encoder
            .encode_utf8(&self.registry.gather(), &mut text)
            .expect("text encoding of gathered metrics");
        (text, prometheus::TEXT_FORMAT)
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
