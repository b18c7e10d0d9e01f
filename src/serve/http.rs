//! The HTTP side: routes, request limits, the predict handler and its
//! answers. Model code is reached only through [`super::model`] and the
//! model's [`Batcher`].
//!
//! ```text
//! GET  /                               the upload page (page.html)
//! GET  /healthz                        200 while the process serves
//! GET  /readyz                         200 once every model is loaded, else 503
//! GET  /metrics                        Prometheus text format
//! GET  /v1/models                      every model (name, task, classes, encoder, sha256)
//! GET  /v1/models/{name}               one model, with its model card
//! POST /v1/models/{name}/predict       one image as the body, or several as multipart/form-data
//! ```
//!
//! Refusals are JSON `{"error": {"status", "message", "request_id"}}`:
//! 400 empty or unreadable body, 404 unknown model or route, 408 body not
//! received in time, 413 body or image count over the limit, 415 a content
//! type that is not an image, 422 an image that does not decode (unknown
//! format, truncated, over the pixel guard), 503 model loading, queue full
//! or too many requests in flight (with `Retry-After`), 504 no answer in time.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::{ConnectInfo, FromRequest, Multipart, Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, Uri, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use http_body_util::BodyExt;
use serde::{Deserialize, Serialize};

use super::answer::{Answer, ErrorBody, ErrorResponse, ImagePrediction, PredictResponse};
use super::audit::{AuditSender, InferenceRecord, format_time, now_ms};
use super::batcher::Batcher;
use super::metrics::Metrics;
use super::model::{ImageProblem, ModelSource, RawResult, RenderOptions};

/// The upload page at `/`: plain HTML and a little JavaScript, no CDN.
const PAGE: &str = include_str!("page.html");

/// Image content types a raw body may declare (the format itself is read
/// from the bytes).
const IMAGE_TYPES: [&str; 8] = [
    "image/png",
    "image/jpeg",
    "image/jpg",
    "image/tiff",
    "image/bmp",
    "image/x-ms-bmp",
    "image/webp",
    "application/octet-stream",
];

/// What a request may hold, and how long it may take.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest request body, in bytes.
    pub max_body_bytes: usize,
    /// Largest image, in pixels (checked on the header, before decoding).
    pub max_pixels: u64,
    /// Most images in one request.
    pub max_images: usize,
    /// From arrival to answer, body upload included.
    pub request_timeout: Duration,
    /// Predict requests handled at once; past it, 503 at once.
    pub max_concurrent_requests: usize,
    /// Top classes listed when the request does not say (`?top_k=`).
    pub default_top_k: usize,
}

/// A model the server was asked to serve, and its batcher once loaded.
pub struct Slot {
    pub name: String,
    pub source: ModelSource,
    pub served: OnceLock<Batcher>,
}

/// What every handler shares.
pub struct AppState {
    pub slots: Vec<Slot>,
    pub limits: Limits,
    /// One permit per predict request being handled
    /// (`--max-concurrent-requests`).
    pub in_flight: tokio::sync::Semaphore,
    pub metrics: Metrics,
    pub audit: Option<AuditSender>,
}

impl AppState {
    fn slot(&self, name: &str) -> Option<&Slot> {
        self.slots.iter().find(|slot| slot.name == name)
    }

    fn ready(&self) -> bool {
        self.slots.iter().all(|slot| slot.served.get().is_some())
    }
}

/// The router with every route. Predict limits (in-flight requests, body
/// size, timeout) are applied by the predict handler itself, so that each
/// refusal is counted and answered in the same JSON shape.
pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/", get(|| async { Html(PAGE) }))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/v1/models", get(list_models))
        .route("/v1/models/{name}", get(show_model))
        .route("/v1/models/{name}/predict", post(predict))
        .fallback(no_route)
        // The predict handler counts body bytes itself.
        .layer(axum::extract::DefaultBodyLimit::disable())
        .with_state(state)
}

/// `{"error": ...}` with its status (and the request's id where it has one).
fn refusal_response(
    status: StatusCode,
    message: String,
    request_id: Option<&str>,
    retry_after: Option<u64>,
) -> Response {
    let body = ErrorResponse {
        error: ErrorBody {
            status: status.as_u16(),
            message,
            request_id: request_id.map(str::to_string),
        },
    };
    let mut response = json_response(status, &body);
    if let Some(seconds) = retry_after {
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
    }
    if let Some(id) = request_id.and_then(|id| HeaderValue::from_str(id).ok()) {
        response.headers_mut().insert("x-request-id", id);
    }
    response
}

/// Too many predict requests in flight: refused at once (load shedding),
/// before the body is read.
fn overloaded(state: &AppState, model: &str, request_id: &str) -> Response {
    state
        .metrics
        .requests
        .with_label_values(&[model, "503"])
        .inc();
    refusal_response(
        StatusCode::SERVICE_UNAVAILABLE,
        format!(
            "the server is handling {} predict requests, its limit \
             (--max-concurrent-requests); retry later",
            state.limits.max_concurrent_requests
        ),
        Some(request_id),
        Some(1),
    )
}

/// A JSON answer (`application/json`): serialized once into the body, with
/// no JSON extractor pulled in (axum's `json` feature turns on serde_json's
/// `raw_value` for the whole tree).
fn json_response<T: Serialize>(status: StatusCode, value: &T) -> Response {
    match serde_json::to_vec(value) {
        Ok(bytes) => {
            let mut response = Response::new(Body::from(bytes));
            *response.status_mut() = status;
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            response
        }
        Err(error) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("the answer could not be written as JSON: {error}"),
        )
            .into_response(),
    }
}

async fn no_route(uri: Uri, method: axum::http::Method) -> Response {
    refusal_response(
        StatusCode::NOT_FOUND,
        format!("no route {method} {uri}: see GET /v1/models and POST /v1/models/NAME/predict"),
        None,
        None,
    )
}

async fn healthz() -> Response {
    json_response(StatusCode::OK, &serde_json::json!({"status": "ok"}))
}

async fn readyz(State(state): State<Arc<AppState>>) -> Response {
    let models: serde_json::Map<String, serde_json::Value> = state
        .slots
        .iter()
        .map(|slot| {
            let status = if slot.served.get().is_some() {
                "ready"
            } else {
                "loading"
            };
            (slot.name.clone(), status.into())
        })
        .collect();
    let ready = state.ready();
    let body = serde_json::json!({
        "status": if ready { "ready" } else { "loading" },
        "models": models,
    });
    if ready {
        json_response(StatusCode::OK, &body)
    } else {
        let mut response = json_response(StatusCode::SERVICE_UNAVAILABLE, &body);
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(1u64));
        response
    }
}

async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    let (text, content_type) = state.metrics.render();
    ([(header::CONTENT_TYPE, content_type)], text).into_response()
}

/// A model's description: its `ModelInfo` without the model card (with
/// `full`, with it), and whether it is ready.
fn describe(slot: &Slot, full: bool) -> serde_json::Value {
    match slot.served.get() {
        Some(batcher) => {
            let mut value =
                serde_json::to_value(batcher.model().info()).unwrap_or(serde_json::Value::Null);
            if let Some(object) = value.as_object_mut() {
                if !full {
                    object.remove("model_card");
                }
                object.insert("ready".into(), true.into());
            }
            value
        }
        None => serde_json::json!({
            "name": slot.name,
            "source": slot.source.to_string(),
            "ready": false,
        }),
    }
}

async fn list_models(State(state): State<Arc<AppState>>) -> Response {
    let models: Vec<serde_json::Value> = state.slots.iter().map(|s| describe(s, false)).collect();
    json_response(
        StatusCode::OK,
        &serde_json::json!({ "models": models, "ready": state.ready() }),
    )
}

async fn show_model(State(state): State<Arc<AppState>>, Path(name): Path<String>) -> Response {
    match state.slot(&name) {
        Some(slot) => json_response(StatusCode::OK, &describe(slot, true)),
        None => unknown_model(&state, &name, None),
    }
}

fn unknown_model(state: &AppState, name: &str, request_id: Option<&str>) -> Response {
    let known: Vec<&str> = state.slots.iter().map(|s| s.name.as_str()).collect();
    refusal_response(
        StatusCode::NOT_FOUND,
        format!(
            "no model named {name:?}; this server has {}",
            known.join(", ")
        ),
        request_id,
        None,
    )
}

/// `?top_k=3&heatmap=true&mask=true`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PredictParams {
    pub top_k: Option<usize>,
    pub heatmap: Option<bool>,
    pub mask: Option<bool>,
}

/// A refused request: status, message, and `Retry-After` seconds.
struct Refusal {
    status: StatusCode,
    message: String,
    retry_after: Option<u64>,
}

impl Refusal {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Refusal {
            status,
            message: message.into(),
            retry_after: None,
        }
    }
}

/// Where a request is, for the timeout's answer.
#[repr(u8)]
enum Phase {
    Reading = 0,
    Predicting = 1,
}

/// A time-ordered request id: milliseconds since 1970, then 80 random
/// bits, as 32 hex digits.
fn new_request_id() -> String {
    let random: u128 = rand::random::<u128>() >> 48;
    format!("{:012x}{random:020x}", now_ms() as u64 & 0xffff_ffff_ffff)
}

async fn predict(
    State(state): State<Arc<AppState>>,
    Path(name): Path<String>,
    params: Result<Query<PredictParams>, axum::extract::rejection::QueryRejection>,
    ConnectInfo(client): ConnectInfo<SocketAddr>,
    request: Request,
) -> Response {
    let arrived = Instant::now();
    let request_id = new_request_id();
    let Some(slot) = state.slot(&name) else {
        state.metrics.requests.with_label_values(&["", "404"]).inc();
        return unknown_model(&state, &name, Some(&request_id));
    };
    let Ok(_permit) = state.in_flight.try_acquire() else {
        return overloaded(&state, &slot.name, &request_id);
    };
    let phase = AtomicU8::new(Phase::Reading as u8);
    let timeout = state.limits.request_timeout;
    let handled = tokio::time::timeout(
        timeout,
        handle(&state, slot, &request_id, params, request, &phase),
    )
    .await;
    let result = match handled {
        Ok(result) => result,
        Err(_) if phase.load(Ordering::SeqCst) == Phase::Reading as u8 => Err(Refusal::new(
            StatusCode::REQUEST_TIMEOUT,
            format!(
                "the request body was not received within {} s (--request-timeout-secs)",
                timeout.as_secs_f64()
            ),
        )),
        Err(_) => Err(Refusal::new(
            StatusCode::GATEWAY_TIMEOUT,
            format!(
                "no answer within {} s (--request-timeout-secs): the model is busy",
                timeout.as_secs_f64()
            ),
        )),
    };
    let latency = arrived.elapsed();
    let metrics = &state.metrics;
    metrics
        .latency
        .with_label_values(&[name.as_str()])
        .observe(latency.as_secs_f64());
    match result {
        Ok((task, model_sha256, predictions)) => {
            let latency_ms = latency.as_secs_f64() * 1e3;
            if let Some(audit) = &state.audit {
                let time_ms = now_ms();
                for prediction in &predictions {
                    // Handed over before the answer leaves: a 2xx is never
                    // missing from the trail of a server that stopped cleanly.
                    audit.record(InferenceRecord {
                        request_id: request_id.clone(),
                        image_index: prediction.index as u32,
                        time: format_time(time_ms),
                        time_ms,
                        model: name.clone(),
                        model_sha256: model_sha256.clone(),
                        task: task.to_string(),
                        image_sha256: prediction.image_id.clone(),
                        answer: prediction.answer.audit_json(),
                        latency_ms,
                        client: client.to_string(),
                    });
                }
            }
            metrics
                .requests
                .with_label_values(&[name.as_str(), "200"])
                .inc();
            let body = PredictResponse {
                request_id: request_id.clone(),
                model: name,
                task: task.to_string(),
                model_sha256,
                predictions,
                latency_ms,
            };
            let mut response = json_response(StatusCode::OK, &body);
            if let Ok(id) = HeaderValue::from_str(&request_id) {
                response.headers_mut().insert("x-request-id", id);
            }
            response
        }
        Err(refusal) => {
            metrics
                .requests
                .with_label_values(&[name.as_str(), refusal.status.as_str()])
                .inc();
            refusal_response(
                refusal.status,
                refusal.message,
                Some(&request_id),
                refusal.retry_after,
            )
        }
    }
}

/// An uploaded image: its bytes, its multipart file name, and how errors name it.
struct Upload {
    bytes: Vec<u8>,
    filename: Option<String>,
    label: String,
}

type Answered = (&'static str, String, Vec<ImagePrediction>);

async fn handle(
    state: &AppState,
    slot: &Slot,
    request_id: &str,
    params: Result<Query<PredictParams>, axum::extract::rejection::QueryRejection>,
    request: Request,
    phase: &AtomicU8,
) -> Result<Answered, Refusal> {
    let limits = state.limits;
    let Query(params) = params.map_err(|rejection| {
        Refusal::new(
            StatusCode::BAD_REQUEST,
            format!(
                "{}; the parameters are top_k (a number), heatmap and mask (true or false)",
                rejection.body_text()
            ),
        )
    })?;
    let options = RenderOptions {
        top_k: params.top_k.unwrap_or(limits.default_top_k),
        heatmap: params.heatmap.unwrap_or(false),
        mask: params.mask.unwrap_or(false),
    };
    if options.top_k == 0 {
        return Err(Refusal::new(
            StatusCode::BAD_REQUEST,
            "top_k must be 1 or more",
        ));
    }
    let Some(batcher) = slot.served.get() else {
        return Err(Refusal {
            status: StatusCode::SERVICE_UNAVAILABLE,
            message: format!("model {} is still loading (see GET /readyz)", slot.name),
            retry_after: Some(1),
        });
    };
    let uploads = read_images(request, &limits).await?;
    phase.store(Phase::Predicting as u8, Ordering::SeqCst);

    let reservation = batcher.reserve(uploads.len()).map_err(|full| Refusal {
        status: StatusCode::SERVICE_UNAVAILABLE,
        message: format!(
            "model {} has {} images waiting, its limit (--max-queue {}); retry later",
            slot.name, full.waiting, full.max_queue
        ),
        retry_after: Some(1),
    })?;
    let model = batcher.model().clone();
    let filenames: Vec<Option<String>> = uploads.iter().map(|u| u.filename.clone()).collect();
    let max_pixels = limits.max_pixels;
    let preparing = model.clone();
    let prepared = tokio::task::spawn_blocking(move || {
        uploads
            .iter()
            .map(|upload| preparing.prepare(&upload.bytes, &upload.label, max_pixels))
            .collect::<Result<Vec<_>, _>>()
    })
    .await
    .map_err(|e| internal(request_id, format!("decoding failed: {e}")))?
    .map_err(|error| {
        let status = match error.problem {
            ImageProblem::Empty => StatusCode::BAD_REQUEST,
            ImageProblem::UnknownFormat
            | ImageProblem::TooManyPixels
            | ImageProblem::Undecodable
            | ImageProblem::NoEncoder => StatusCode::UNPROCESSABLE_ENTITY,
            ImageProblem::DamagedCache => StatusCode::INTERNAL_SERVER_ERROR,
        };
        Refusal::new(status, error.message)
    })?;
    let receivers = reservation.submit(prepared);
    let mut outcomes = Vec::with_capacity(receivers.len());
    for receiver in receivers {
        let outcome = receiver
            .await
            .map_err(|_| internal(request_id, "the model's batch thread stopped".into()))?
            .map_err(|message| internal(request_id, message))?;
        outcomes.push(outcome);
    }
    // Class probabilities render to their top classes (no picture) in
    // microseconds: here, sparing a lone request two thread hand-offs.
    // Heat maps and masks are drawn on the blocking pool.
    let draws = outcomes
        .iter()
        .any(|outcome| !matches!(outcome.result, RawResult::Classes(_)));
    let rendering = model.clone();
    let render_all = move || {
        outcomes
            .into_iter()
            .map(|outcome| {
                rendering
                    .render(outcome.result, &options)
                    .map(|rendered| (outcome.image_id, outcome.features_from, rendered))
            })
            .collect::<Result<Vec<_>, String>>()
    };
    let rendered = if draws {
        tokio::task::spawn_blocking(render_all)
            .await
            .map_err(|e| internal(request_id, format!("rendering failed: {e}")))?
    } else {
        render_all()
    }
    .map_err(|message| internal(request_id, message))?;
    let predictions = rendered
        .into_iter()
        .zip(filenames)
        .enumerate()
        .map(
            |(index, ((image_id, features_from, rendered), filename))| ImagePrediction {
                index,
                filename,
                image_id,
                features_from: features_from.to_string(),
                answer: Answer::from(rendered),
            },
        )
        .collect();
    Ok((model.task(), model.info().model_sha256.clone(), predictions))
}

fn internal(request_id: &str, message: String) -> Refusal {
    eprintln!("serve: request {request_id}: {message}");
    Refusal::new(StatusCode::INTERNAL_SERVER_ERROR, message)
}

/// The media type of a `Content-Type` value, lower case, without parameters.
fn essence(value: &str) -> String {
    value
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase()
}

/// Whether a declared content type may hold an image (the bytes say which).
fn image_content_type(essence: &str) -> Result<(), String> {
    if IMAGE_TYPES.contains(&essence) {
        return Ok(());
    }
    if essence.starts_with("image/") {
        return Err(format!(
            "{essence} is not a format lazarus decodes (PNG, JPEG, TIFF, BMP, WebP)"
        ));
    }
    Err(format!(
        "Content-Type {essence} is not an image: send one image as image/png, image/jpeg, \
         image/tiff, image/bmp or image/webp, or several as multipart/form-data"
    ))
}

/// The request's images: the raw body, or every part of a multipart body.
async fn read_images(request: Request, limits: &Limits) -> Result<Vec<Upload>, Refusal> {
    let content_type = request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(essence);
    let Some(content_type) = content_type else {
        return Err(Refusal::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "no Content-Type: send one image as image/png, image/jpeg, image/tiff, image/bmp \
             or image/webp, or several as multipart/form-data",
        ));
    };
    let declared = check_length(request.headers(), limits)?;
    if content_type == "multipart/form-data" {
        return read_multipart(request, limits).await;
    }
    image_content_type(&content_type)
        .map_err(|message| Refusal::new(StatusCode::UNSUPPORTED_MEDIA_TYPE, message))?;
    let mut body = request.into_body();
    // The declared length (within the limit) sizes the buffer once.
    let expected = declared.map_or(0, |length| length as usize);
    let bytes = read_limited(&mut body, limits.max_body_bytes, expected).await?;
    if bytes.is_empty() {
        return Err(Refusal::new(
            StatusCode::BAD_REQUEST,
            "empty body: send the image's bytes as the request body",
        ));
    }
    Ok(vec![Upload {
        bytes,
        filename: None,
        label: "body".into(),
    }])
}

/// The declared body length; one over the limit is refused before any byte
/// is read (with `Expect: 100-continue`, before the client sends one).
fn check_length(headers: &HeaderMap, limits: &Limits) -> Result<Option<u64>, Refusal> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    match declared {
        Some(length) if length > limits.max_body_bytes as u64 => Err(too_large(length, limits)),
        _ => Ok(declared),
    }
}

fn too_large(length: u64, limits: &Limits) -> Refusal {
    Refusal::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        format!(
            "the request body of {length} bytes exceeds the limit of {} bytes (--max-body)",
            limits.max_body_bytes
        ),
    )
}

/// Bytes of an over-long body read and dropped before the 413 goes out,
/// at most: a client still sending would otherwise see the connection
/// reset instead of the answer.
const DRAIN_BYTES: usize = 64 << 20;
/// And for at most this long.
const DRAIN_TIME: Duration = Duration::from_secs(2);

async fn read_limited(body: &mut Body, limit: usize, expected: usize) -> Result<Vec<u8>, Refusal> {
    let mut bytes = Vec::with_capacity(expected.min(limit));
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| {
            Refusal::new(
                StatusCode::BAD_REQUEST,
                format!("the request body could not be read to its end: {e}"),
            )
        })?;
        if let Ok(data) = frame.into_data() {
            if bytes.len() + data.len() > limit {
                drain(body).await;
                return Err(Refusal::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!("the request body exceeds the limit of {limit} bytes (--max-body)"),
                ));
            }
            bytes.extend_from_slice(&data);
        }
    }
    Ok(bytes)
}

/// Reads and drops what is left of a body, within `DRAIN_BYTES` and `DRAIN_TIME`.
async fn drain(body: &mut Body) {
    let deadline = Instant::now() + DRAIN_TIME;
    let mut dropped = 0usize;
    while dropped < DRAIN_BYTES {
        match tokio::time::timeout_at(tokio::time::Instant::from_std(deadline), body.frame()).await
        {
            Ok(Some(Ok(frame))) => dropped += frame.data_ref().map_or(0, |d| d.len()),
            _ => break,
        }
    }
}

async fn read_multipart(request: Request, limits: &Limits) -> Result<Vec<Upload>, Refusal> {
    let mut multipart = Multipart::from_request(request, &())
        .await
        .map_err(|rejection| Refusal::new(StatusCode::BAD_REQUEST, rejection.body_text()))?;
    let broken = |e: axum::extract::multipart::MultipartError| {
        Refusal::new(
            StatusCode::BAD_REQUEST,
            format!("the multipart body could not be read: {}", e.body_text()),
        )
    };
    let mut uploads: Vec<Upload> = Vec::new();
    let mut total = 0usize;
    while let Some(mut field) = multipart.next_field().await.map_err(broken)? {
        let index = uploads.len();
        if index == limits.max_images {
            return Err(Refusal::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!(
                    "more than {} images in one request (--max-images)",
                    limits.max_images
                ),
            ));
        }
        let filename = field.file_name().map(str::to_string);
        let label = match (&filename, field.name()) {
            (Some(file), _) => format!("part {index} ({file})"),
            (None, Some(name)) if !name.is_empty() => format!("part {index} ({name})"),
            _ => format!("part {index}"),
        };
        if let Some(declared) = field.content_type().map(essence)
            && let Err(message) = image_content_type(&declared)
        {
            return Err(Refusal::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                format!("{label}: {message}"),
            ));
        }
        let mut bytes = Vec::new();
        while let Some(chunk) = field.chunk().await.map_err(broken)? {
            total += chunk.len();
            if total > limits.max_body_bytes {
                return Err(Refusal::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!(
                        "the request body exceeds the limit of {} bytes (--max-body)",
                        limits.max_body_bytes
                    ),
                ));
            }
            bytes.extend_from_slice(&chunk);
        }
        if bytes.is_empty() {
            return Err(Refusal::new(
                StatusCode::BAD_REQUEST,
                format!("{label} is empty"),
            ));
        }
        uploads.push(Upload {
            bytes,
            filename,
            label,
        });
    }
    if uploads.is_empty() {
        return Err(Refusal::new(
            StatusCode::BAD_REQUEST,
            "the multipart body holds no images",
        ));
    }
    Ok(uploads)
}

/// Model names a server accepts: letters, digits, `.`, `_`, `-` (they are
/// URL path segments and metric labels).
pub fn valid_model_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

/// Index of slots by name, checked unique.
pub fn check_unique_names(slots: &[Slot]) -> Result<(), String> {
    let mut seen: HashMap<&str, &ModelSource> = HashMap::new();
    for slot in slots {
        if let Some(other) = seen.insert(&slot.name, &slot.source) {
            return Err(format!(
                "two models are named {:?} ({other} and {}): name one with --name or NAME=",
                slot.name, slot.source
            ));
        }
    }
    Ok(())
}
