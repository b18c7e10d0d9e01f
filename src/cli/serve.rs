//! `lazarus serve` and `lazarus serve-log`: arguments to settings; the work
//! is in `lazarus::serve`.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args;
use lazarus::experiments::{Cell, Table};
use lazarus::layout::Layout;
use lazarus::serve::{
    BatchConfig, InferenceRecord, Limits, LogQuery, ModelSource, ModelSpec, ServeConfig, ServeEvent,
};

use super::queue::DeviceArg;

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// An exported bundle to serve (repeatable), named by its folder, or
    /// NAME=DIR.
    #[arg(long, value_name = "[NAME=]DIR")]
    pub bundle: Vec<String>,
    /// A finished run to serve (repeatable; classification, anomaly or
    /// segmentation), named by its id, or NAME=RUN.
    #[arg(long, value_name = "[NAME=]RUN")]
    pub run: Vec<String>,
    /// The name of the model, when one is served.
    #[arg(long, value_name = "NAME")]
    pub name: Option<String>,
    /// Address to listen on; loopback unless you say otherwise (the server
    /// has no authentication). Port 0 picks a free port.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub addr: SocketAddr,
    /// Most images a model predicts in one batch.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u64).range(1..=4096))]
    pub max_batch: u64,
    /// Longest an image waits for others to join its batch, in milliseconds.
    #[arg(long, default_value_t = 5)]
    pub max_wait_ms: u64,
    /// Most images waiting per model; past it, 503 with Retry-After.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_queue: u64,
    /// Largest request body (B, KiB, MiB, GiB); past it, 413.
    #[arg(long, default_value = "16MiB")]
    pub max_body: String,
    /// Largest image in pixels, read from its header before decoding
    /// (decompression-bomb guard); past it, 422.
    #[arg(long, default_value_t = 50_000_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_pixels: u64,
    /// Most images in one multipart request; past it, 413.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_images: u64,
    /// Longest a predict request may take, upload included: 408 while its
    /// body is arriving, 504 afterwards.
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..))]
    pub request_timeout_secs: u64,
    /// Predict requests handled at once; past it, 503 at once.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_concurrent_requests: u64,
    /// Top classes in an answer unless the request says (?top_k=).
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..))]
    pub top_k: u64,
    /// Do not record predictions in ROOT/serving/inference_records.db.
    #[arg(long)]
    pub no_audit: bool,
    /// After SIGTERM or SIGINT, how long accepted requests may take to
    /// finish (a second signal stops waiting).
    #[arg(long, default_value_t = 30)]
    pub shutdown_grace_secs: u64,
    #[arg(long, value_enum, default_value = "cpu")]
    pub device: DeviceArg,
}

/// `NAME=VALUE` with a valid NAME (letters, digits, '.', '_', '-'), else
/// the whole text as the value.
fn split_name(text: &str) -> (Option<String>, String) {
    if let Some((name, value)) = text.split_once('=')
        && lazarus::serve::http::valid_model_name(name)
        && !value.is_empty()
    {
        return (Some(name.to_string()), value.to_string());
    }
    (None, text.to_string())
}

fn models(args: &ServeArgs) -> anyhow::Result<Vec<ModelSpec>> {
    let mut specs = Vec::new();
    for text in &args.bundle {
        let (name, dir) = if std::path::Path::new(text).exists() {
            (None, text.clone())
        } else {
            split_name(text)
        };
        let source = ModelSource::Bundle(PathBuf::from(dir));
        specs.push(ModelSpec {
            name: name.unwrap_or_else(|| ModelSpec::default_name(&source)),
            source,
        });
    }
    for text in &args.run {
        let (name, run) = split_name(text);
        let source = ModelSource::Run(run);
        specs.push(ModelSpec {
            name: name.unwrap_or_else(|| ModelSpec::default_name(&source)),
            source,
        });
    }
    if let Some(name) = &args.name {
        if specs.len() != 1 {
            bail!(
                "--name names the one model served; with {} models give each as NAME=DIR or NAME=RUN",
                specs.len()
            );
        }
        specs[0].name = name.clone();
    }
    Ok(specs)
}

pub fn serve(layout: &Layout, args: ServeArgs) -> anyhow::Result<()> {
    let max_body = super::train::parse_bytes(&args.max_body)
        .with_context(|| format!("--max-body {}", args.max_body))?;
    if max_body == 0 {
        bail!("--max-body must be more than 0 bytes");
    }
    let config = ServeConfig {
        addr: args.addr,
        models: models(&args)?,
        device: super::queue::device(args.device)?,
        batch: BatchConfig {
            max_batch: args.max_batch as usize,
            max_wait: Duration::from_millis(args.max_wait_ms),
            max_queue: args.max_queue as usize,
        },
        limits: Limits {
            max_body_bytes: usize::try_from(max_body).unwrap_or(usize::MAX),
            max_pixels: args.max_pixels,
            max_images: args.max_images as usize,
            request_timeout: Duration::from_secs(args.request_timeout_secs),
            max_concurrent_requests: args.max_concurrent_requests as usize,
            default_top_k: args.top_k as usize,
        },
        audit: !args.no_audit,
        shutdown_grace: Duration::from_secs(args.shutdown_grace_secs),
        io_threads: 2,
    };
    if !args.addr.ip().is_loopback() {
        eprintln!(
            "warning: listening on {}, beyond this machine: the server has no authentication",
            args.addr
        );
    }
    let report = lazarus::serve::serve(layout, config, &|event| print_event(&event))?;
    if report.audit_records.is_none() {
        say("stopped (no audit trail: --no-audit)");
    }
    Ok(())
}

/// One line on stdout, flushed (scripts and tests wait for them).
fn say(line: &str) {
    let mut stdout = std::io::stdout().lock();
    let _ = writeln!(stdout, "{line}");
    let _ = stdout.flush();
}

fn print_event(event: &ServeEvent) {
    match event {
        ServeEvent::Listening(addr) => say(&format!("listening on http://{addr}")),
        ServeEvent::ModelLoaded {
            name,
            source,
            task,
            seconds,
        } => say(&format!(
            "model {name} ({source}, {task}) loaded in {seconds:.2} s"
        )),
        ServeEvent::Ready => say("ready"),
        ServeEvent::Stopping(reason) => say(&format!(
            "stopping ({reason}): no new connections, answering accepted requests"
        )),
        ServeEvent::GraceOver => say("stopping now: requests still open are dropped"),
        ServeEvent::AuditCommitted { path, records } => say(&format!(
            "stopped; audit trail {} holds every answer ({records} records this run)",
            path.display()
        )),
    }
}

#[derive(Debug, Args)]
pub struct ServeLogArgs {
    /// Only this model's records.
    #[arg(long)]
    pub model: Option<String>,
    /// Only this request's records.
    #[arg(long, value_name = "ID")]
    pub request: Option<String>,
    /// Only images whose sha256 starts with these hex digits (4 or more).
    #[arg(long, value_name = "SHA256")]
    pub image: Option<String>,
    /// Only this client (IP, or IP:PORT).
    #[arg(long)]
    pub client: Option<String>,
    /// Records at or after TIME: RFC 3339 (2025-01-31T12:00:00Z) or an age (90s, 15m, 2h, 1d).
    #[arg(long, value_name = "TIME")]
    pub since: Option<String>,
    /// Records before TIME (same forms as --since).
    #[arg(long, value_name = "TIME")]
    pub until: Option<String>,
    /// Most records listed (the newest; 0 for all).
    #[arg(long, default_value_t = 100)]
    pub limit: u64,
    /// Oldest first (and --limit keeps the oldest).
    #[arg(long)]
    pub oldest_first: bool,
    #[arg(long, conflicts_with = "csv")]
    pub json: bool,
    #[arg(long)]
    pub csv: bool,
}

/// Milliseconds since 1970 of an RFC 3339 time or of an age before now.
fn parse_time(flag: &str, text: &str) -> anyhow::Result<i64> {
    let now = std::time::SystemTime::now();
    let time = match humantime::parse_rfc3339_weak(text) {
        Ok(time) => time,
        Err(_) => {
            let age = humantime::parse_duration(text).with_context(|| {
                format!("{flag} {text:?}: give an RFC 3339 time (2025-01-31T12:00:00Z) or an age (15m, 2h, 1d)")
            })?;
            now.checked_sub(age)
                .with_context(|| format!("{flag} {text:?}: before 1970"))?
        }
    };
    Ok(time
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64))
}

pub fn serve_log(layout: &Layout, args: ServeLogArgs) -> anyhow::Result<()> {
    if let Some(image) = &args.image
        && (image.len() < 4 || !image.chars().all(|c| c.is_ascii_hexdigit()))
    {
        bail!("--image {image:?}: give 4 or more hex digits of the image's sha256");
    }
    let query = LogQuery {
        model: args.model.clone(),
        request_id: args.request.clone(),
        image_sha256: args.image.clone(),
        client: args.client.clone(),
        since_ms: args
            .since
            .as_deref()
            .map(|t| parse_time("--since", t))
            .transpose()?,
        until_ms: args
            .until
            .as_deref()
            .map(|t| parse_time("--until", t))
            .transpose()?,
        limit: (args.limit > 0).then_some(args.limit as usize),
        oldest_first: args.oldest_first,
    };
    let records = lazarus::serve::audit::query(layout.root(), &query)?;
    if args.json {
        return super::print_json(&records);
    }
    let table = records_table(&records, args.csv);
    let text = if args.csv {
        table.to_csv()
    } else {
        table.to_text()
    };
    let mut stdout = std::io::stdout().lock();
    match stdout.write_all(text.as_bytes()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => Ok(other?),
    }
}

/// Records as a table: full fields for CSV, a short answer for people.
fn records_table(records: &[InferenceRecord], csv: bool) -> Table {
    let mut table = Table::new([
        "time",
        "request_id",
        "image_index",
        "model",
        "task",
        "image_sha256",
        "answer",
        "latency_ms",
        "client",
        "model_sha256",
    ]);
    for r in records {
        let (image, model_sha256, answer) = if csv {
            (
                r.image_sha256.clone(),
                r.model_sha256.clone(),
                r.answer.to_string(),
            )
        } else {
            (
                r.image_sha256.chars().take(12).collect(),
                r.model_sha256.chars().take(12).collect(),
                summary(&r.answer),
            )
        };
        table.push(vec![
            Cell::text(&r.time),
            Cell::text(&r.request_id),
            Cell::Integer(r.image_index as i64),
            Cell::text(&r.model),
            Cell::text(&r.task),
            Cell::text(image),
            Cell::text(answer),
            Cell::Number(r.latency_ms),
            Cell::text(&r.client),
            Cell::text(model_sha256),
        ]);
    }
    table
}

/// `cat 0.931`, `anomalous 0.8123`, `foreground 0.124`.
fn summary(answer: &serde_json::Value) -> String {
    if let Some(top) = answer["top"].as_array().and_then(|top| top.first()) {
        return format!(
            "{} {:.3}",
            top[0].as_str().unwrap_or("?"),
            top[1].as_f64().unwrap_or(f64::NAN)
        );
    }
    if let Some(score) = answer["score"].as_f64() {
        let call = if answer["anomalous"].as_bool() == Some(true) {
            "anomalous"
        } else {
            "normal"
        };
        return format!("{call} {score:.4}");
    }
    if let Some(fraction) = answer["foreground_fraction"].as_f64() {
        return format!("foreground {fraction:.3}");
    }
    answer.to_string()
}
