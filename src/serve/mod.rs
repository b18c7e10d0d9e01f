//! `lazarus serve`: trained heads behind HTTP, with dynamic batching, limits
//! and back-pressure, Prometheus metrics and an audit trail.
//!
//! - `model.rs`: the one adapter to model code (load a run or a bundle,
//!   prepare an image from bytes, predict a batch). Serving owns no model
//!   code: it calls the same library functions as `lazarus predict`.
//! - `batcher.rs`: a bounded queue and a batch thread per model.
//! - `http.rs`: routes (axum), limits, the predict handler; `page.html` is
//!   the page at `/`.
//! - `answer.rs`: the JSON answers.
//! - `metrics.rs`: the Prometheus registry.
//! - `audit.rs`: `ROOT/serving/inference_records.db` and `serve-log`.
//!
//! [`serve`] binds first (so `/healthz` answers at once), loads the models
//! on a thread (`/readyz` turns 200 when all are loaded; a model that fails
//! to load stops the server with its error), and serves until SIGTERM or
//! SIGINT. Then it stops accepting, answers every request it accepted
//! (for at most `shutdown_grace`; a second signal stops waiting), stops the
//! batch threads and commits the audit trail.

pub mod answer;
pub mod audit;
pub mod batcher;
pub mod http;
pub mod metrics;
pub mod model;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use candle_core::Device;

pub use audit::{InferenceRecord, LogQuery};
pub use batcher::BatchConfig;
pub use http::Limits;
pub use model::ModelSource;

use crate::layout::Layout;

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("{0}")]
    Invalid(String),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("model {name} ({source_name}) could not be loaded: {message}")]
    Load {
        name: String,
        source_name: String,
        message: String,
    },
    #[error("the server's runtime: {0}")]
    Runtime(std::io::Error),
    #[error("audit trail: {0}")]
    Audit(#[from] audit::AuditError),
}

/// A model to serve and the name it is served under.
#[derive(Debug, Clone)]
pub struct ModelSpec {
    pub name: String,
    pub source: ModelSource,
}

impl ModelSpec {
    /// The default name: a bundle's folder name, or the run id.
    pub fn default_name(source: &ModelSource) -> String {
        match source {
            ModelSource::Run(run) => run.clone(),
            ModelSource::Bundle(dir) => dir
                .canonicalize()
                .unwrap_or_else(|_| dir.clone())
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| "bundle".into()),
        }
    }
}

/// Everything `lazarus serve` is told.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub addr: SocketAddr,
    pub models: Vec<ModelSpec>,
    pub device: Device,
    pub batch: BatchConfig,
    pub limits: Limits,
    /// Record every answered prediction in `ROOT/serving/inference_records.db`.
    pub audit: bool,
    /// How long accepted requests may take to finish after a stop signal.
    pub shutdown_grace: Duration,
    /// Threads of the async runtime (connections and request handling;
    /// decoding and models run on their own threads).
    pub io_threads: usize,
}

/// What the server tells its operator as it goes.
#[derive(Debug, Clone)]
pub enum ServeEvent {
    Listening(SocketAddr),
    ModelLoaded {
        name: String,
        source: String,
        task: &'static str,
        seconds: f64,
    },
    Ready,
    Stopping(&'static str),
    GraceOver,
    AuditCommitted {
        path: PathBuf,
        records: u64,
    },
}

/// How a server ended.
#[derive(Debug, Clone)]
pub struct ServeReport {
    pub audit_records: Option<u64>,
}

/// Serves `config.models` until SIGTERM or SIGINT; see the module docs.
pub fn serve(
    layout: &Layout,
    config: ServeConfig,
    events: &(dyn Fn(ServeEvent) + Sync),
) -> Result<ServeReport, ServeError> {
    if config.models.is_empty() {
        return Err(ServeError::Invalid(
            "no model to serve: give --bundle DIR or --run RUN".into(),
        ));
    }
    for spec in &config.models {
        if !http::valid_model_name(&spec.name) {
            return Err(ServeError::Invalid(format!(
                "model name {:?} ({}): use letters, digits, '.', '_' and '-' (name it with --name or NAME=)",
                spec.name, spec.source
            )));
        }
    }
    let slots: Vec<http::Slot> = config
        .models
        .iter()
        .map(|spec| http::Slot {
            name: spec.name.clone(),
            source: spec.source.clone(),
            served: OnceLock::new(),
        })
        .collect();
    http::check_unique_names(&slots).map_err(ServeError::Invalid)?;
    let metrics = metrics::Metrics::new();
    for spec in &config.models {
        metrics.add_model(&spec.name);
    }
    let audit = if config.audit {
        Some(audit::AuditWriter::start(layout.root(), metrics.clone())?)
    } else {
        None
    };
    let state = Arc::new(http::AppState {
        slots,
        limits: config.limits,
        in_flight: tokio::sync::Semaphore::new(config.limits.max_concurrent_requests.max(1)),
        metrics: metrics.clone(),
        audit: audit.as_ref().map(|a| a.sender()),
    });
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(config.io_threads.max(1))
        .max_blocking_threads(
            std::thread::available_parallelism()
                .map_or(2, |n| n.get())
                .max(2),
        )
        .thread_name("serve")
        .enable_all()
        .build()
        .map_err(ServeError::Runtime)?;
    let stopping = Arc::new(AtomicBool::new(false));
    let result = runtime.block_on(run(layout, &config, state.clone(), &stopping, events));
    // Tasks still running here are requests the grace left unanswered:
    // none of them can answer after this, so the trail holds every answer.
    runtime.shutdown_timeout(Duration::from_secs(1));
    stopping.store(true, Ordering::SeqCst);
    for slot in &state.slots {
        if let Some(batcher) = slot.served.get() {
            batcher.close();
        }
    }
    let audit_records = match audit {
        Some(writer) => {
            let path = writer.path().to_path_buf();
            let records = writer.finish()?;
            events(ServeEvent::AuditCommitted { path, records });
            Some(records)
        }
        None => None,
    };
    result?;
    Ok(ServeReport { audit_records })
}

/// Loads every model on its own thread, one after the other; the first
/// failure is sent back and ends the loading.
fn start_loading(
    layout: &Layout,
    config: &ServeConfig,
    state: Arc<http::AppState>,
    stopping: Arc<AtomicBool>,
    events: tokio::sync::mpsc::UnboundedSender<Result<ServeEvent, ServeError>>,
) -> std::thread::JoinHandle<()> {
    let layout = layout.clone();
    let device = config.device.clone();
    let batch = config.batch;
    std::thread::Builder::new()
        .name("serve-load".into())
        .spawn(move || {
            for slot in &state.slots {
                if stopping.load(Ordering::SeqCst) {
                    return;
                }
                let started = Instant::now();
                match model::LoadedModel::load(&layout, &slot.name, &slot.source, &device) {
                    Ok(loaded) => {
                        let task = loaded.task();
                        let batcher =
                            batcher::Batcher::start(Arc::new(loaded), batch, state.metrics.clone());
                        if slot.served.set(batcher).is_err() {
                            unreachable!("each slot is loaded once");
                        }
                        let _ = events.send(Ok(ServeEvent::ModelLoaded {
                            name: slot.name.clone(),
                            source: slot.source.to_string(),
                            task,
                            seconds: started.elapsed().as_secs_f64(),
                        }));
                    }
                    Err(error) => {
                        let _ = events.send(Err(ServeError::Load {
                            name: slot.name.clone(),
                            source_name: slot.source.to_string(),
                            message: error.to_string(),
                        }));
                        return;
                    }
                }
            }
            let _ = events.send(Ok(ServeEvent::Ready));
        })
        .expect("the loading thread starts")
}

async fn run(
    layout: &Layout,
    config: &ServeConfig,
    state: Arc<http::AppState>,
    stopping: &Arc<AtomicBool>,
    events: &(dyn Fn(ServeEvent) + Sync),
) -> Result<(), ServeError> {
    use axum::serve::ListenerExt;
    use tokio::signal::unix::{SignalKind, signal};
    let listener = tokio::net::TcpListener::bind(config.addr)
        .await
        .map_err(|source| ServeError::Bind {
            addr: config.addr,
            source,
        })?;
    let local = listener.local_addr().map_err(|source| ServeError::Bind {
        addr: config.addr,
        source,
    })?;
    let mut terminate = signal(SignalKind::terminate()).map_err(ServeError::Runtime)?;
    let mut interrupt = signal(SignalKind::interrupt()).map_err(ServeError::Runtime)?;
    events(ServeEvent::Listening(local));

    let (load_sender, mut loading) = tokio::sync::mpsc::unbounded_channel();
    let loader = start_loading(layout, config, state.clone(), stopping.clone(), load_sender);

    let app = http::router(state).into_make_service_with_connect_info::<SocketAddr>();
    let (stop_sender, stop_receiver) = tokio::sync::oneshot::channel::<()>();
    // Answers leave at once: no Nagle delay on small writes.
    let listener = listener.tap_io(|stream| {
        let _ = stream.set_nodelay(true);
    });
    let server = axum::serve(listener, app).with_graceful_shutdown(async move {
        let _ = stop_receiver.await;
    });
    let mut server = std::pin::pin!(server.into_future());

    // Serve until a signal (or a model that fails to load).
    let mut failure = None;
    let mut loads_open = true;
    let reason = loop {
        tokio::select! {
            result = &mut server => {
                // The server ended by itself: an accept loop error.
                result.map_err(ServeError::Runtime)?;
                return Ok(());
            }
            _ = terminate.recv() => break "SIGTERM",
            _ = interrupt.recv() => break "SIGINT",
            event = loading.recv(), if loads_open => match event {
                Some(Ok(event)) => events(event),
                Some(Err(error)) => {
                    failure = Some(error);
                    break "a model failed to load";
                }
                None => loads_open = false,
            },
        }
    };
    events(ServeEvent::Stopping(reason));
    stopping.store(true, Ordering::SeqCst);
    let _ = stop_sender.send(());
    // Accepted requests finish, within the grace (a second signal ends it).
    let grace = tokio::time::sleep(config.shutdown_grace);
    tokio::select! {
        result = &mut server => result.map_err(ServeError::Runtime)?,
        _ = grace => events(ServeEvent::GraceOver),
        _ = terminate.recv() => events(ServeEvent::GraceOver),
        _ = interrupt.recv() => events(ServeEvent::GraceOver),
    }
    // A model still loading finishes first (it cannot be interrupted).
    let _ = tokio::task::spawn_blocking(move || loader.join()).await;
    match failure {
        Some(error) => Err(error),
        None => Ok(()),
    }
}
