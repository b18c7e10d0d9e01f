//! Dynamic batching: one thread per model gathers the images of concurrent
//! requests into one encoder batch.
//!
//! A request first reserves room for its images in the model's bounded
//! queue ([`Batcher::reserve`]; past `max_queue` waiting images it is
//! refused, and the server answers 503), decodes them on the blocking pool,
//! then submits them. The batch thread takes the oldest waiting image and
//! up to `max_batch - 1` more; while other admitted images are still being
//! decoded it waits for them, but never more than `max_wait` past the
//! oldest image's arrival. A lone request therefore never waits, and a
//! busy model fills its batches. Images whose request has gone (the client
//! disconnected, or its timeout passed) are dropped unpredicted.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use super::metrics::Metrics;
use super::model::{LoadedModel, Outcome, Prepared};

/// How a model's batches are formed.
#[derive(Debug, Clone, Copy)]
pub struct BatchConfig {
    /// Most images per batch.
    pub max_batch: usize,
    /// Longest an image waits for others to join its batch.
    pub max_wait: Duration,
    /// Most images waiting (being decoded or queued) per model.
    pub max_queue: usize,
}

/// The model's queue is full.
#[derive(Debug, Clone, Copy)]
pub struct QueueFull {
    pub waiting: usize,
    pub max_queue: usize,
}

/// One image's answer, or why it has none.
pub type Reply = Result<Outcome, String>;

struct Item {
    prepared: Prepared,
    arrived: Instant,
    reply: oneshot::Sender<Reply>,
}

#[derive(Default)]
struct State {
    queue: VecDeque<Item>,
    /// Images admitted whose request is still decoding them.
    preparing: usize,
    closed: bool,
}

struct Shared {
    model: Arc<LoadedModel>,
    config: BatchConfig,
    state: Mutex<State>,
    changed: Condvar,
    metrics: Metrics,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while the lock was held left the queue consistent (no
        // invariant spans an unlock), so poisoning is ignored.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn publish_depth(&self, state: &State) {
        self.metrics
            .queue_depth
            .with_label_values(&[self.model.name()])
            .set((state.queue.len() + state.preparing) as i64);
    }
}

/// A model's queue and batch thread.
pub struct Batcher {
    shared: Arc<Shared>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Batcher {
    pub fn start(model: Arc<LoadedModel>, config: BatchConfig, metrics: Metrics) -> Self {
        let shared = Arc::new(Shared {
            model,
            config: BatchConfig {
                max_batch: config.max_batch.max(1),
                max_queue: config.max_queue.max(1),
                ..config
            },
            state: Mutex::new(State::default()),
            changed: Condvar::new(),
            metrics,
        });
        let worker = shared.clone();
        let thread = std::thread::Builder::new()
            .name(format!("batch-{}", shared.model.name()))
            .spawn(move || batch_loop(&worker))
            .expect("a batch thread starts");
        Batcher {
            shared,
            thread: Mutex::new(Some(thread)),
        }
    }

    pub fn model(&self) -> &Arc<LoadedModel> {
        &self.shared.model
    }

    /// Room for `images` images, or `QueueFull` when the model already has
    /// `max_queue` images waiting (a request larger than the queue is never
    /// admitted).
    pub fn reserve(&self, images: usize) -> Result<Reservation, QueueFull> {
        let mut state = self.shared.lock();
        let waiting = state.queue.len() + state.preparing;
        if state.closed || waiting + images > self.shared.config.max_queue {
            return Err(QueueFull {
                waiting,
                max_queue: self.shared.config.max_queue,
            });
        }
        state.preparing += images;
        self.shared.publish_depth(&state);
        Ok(Reservation {
            shared: self.shared.clone(),
            images,
        })
    }

    /// Lets the thread finish what was admitted, then stops it.
    pub fn close(&self) {
        {
            let mut state = self.shared.lock();
            state.closed = true;
        }
        self.shared.changed.notify_all();
        let thread = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(thread) = thread {
            let _ = thread.join();
        }
    }
}

/// Room in a model's queue for one request's images; released when dropped
/// unsubmitted (a request that failed to decode, or was cancelled).
pub struct Reservation {
    shared: Arc<Shared>,
    images: usize,
}

impl Reservation {
    /// Queues the prepared images (at most as many as reserved); one
    /// receiver per image, in order.
    pub fn submit(mut self, prepared: Vec<Prepared>) -> Vec<oneshot::Receiver<Reply>> {
        assert!(prepared.len() <= self.images, "more images than reserved");
        let arrived = Instant::now();
        let mut receivers = Vec::with_capacity(prepared.len());
        {
            let mut state = self.shared.lock();
            for prepared in prepared {
                let (reply, receiver) = oneshot::channel();
                state.queue.push_back(Item {
                    prepared,
                    arrived,
                    reply,
                });
                receivers.push(receiver);
            }
            state.preparing -= self.images;
            self.images = 0;
            self.shared.publish_depth(&state);
        }
        self.shared.changed.notify_all();
        receivers
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if self.images == 0 {
            return;
        }
        {
            let mut state = self.shared.lock();
            state.preparing -= self.images;
            self.shared.publish_depth(&state);
        }
        self.shared.changed.notify_all();
    }
}

fn batch_loop(shared: &Shared) {
    let config = shared.config;
    loop {
        let batch: Vec<Item> = {
            let mut state = shared.lock();
            loop {
                if !state.queue.is_empty() {
                    break;
                }
                if state.closed && state.preparing == 0 {
                    return;
                }
                state = shared
                    .changed
                    .wait(state)
                    .unwrap_or_else(|e| e.into_inner());
            }
            let deadline = state.queue.front().expect("not empty").arrived + config.max_wait;
            while state.queue.len() < config.max_batch && state.preparing > 0 {
                let now = Instant::now();
                if now >= deadline {
                    break;
                }
                state = shared
                    .changed
                    .wait_timeout(state, deadline - now)
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
            }
            let mut batch = Vec::with_capacity(config.max_batch);
            while batch.len() < config.max_batch {
                let Some(item) = state.queue.pop_front() else {
                    break;
                };
                // Nobody waits for it any more.
                if !item.reply.is_closed() {
                    batch.push(item);
                }
            }
            shared.publish_depth(&state);
            batch
        };
        if batch.is_empty() {
            continue;
        }
        run_batch(shared, batch);
    }
}

fn run_batch(shared: &Shared, batch: Vec<Item>) {
    let model = shared.model.name();
    shared
        .metrics
        .batch_size
        .with_label_values(&[model])
        .observe(batch.len() as f64);
    let (prepared, replies): (Vec<Prepared>, Vec<oneshot::Sender<Reply>>) = batch
        .into_iter()
        .map(|item| (item.prepared, item.reply))
        .unzip();
    let count = prepared.len();
    // A panic in model code fails this batch's images, not the server.
    let outcomes = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        shared.model.predict(prepared)
    }))
    .unwrap_or_else(|panic| {
        let message = panic
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| panic.downcast_ref::<&str>().copied())
            .unwrap_or("unknown panic");
        (0..count)
            .map(|_| Err(format!("model {model} panicked: {message}")))
            .collect()
    });
    for (reply, outcome) in replies.into_iter().zip(outcomes) {
        if let Ok(outcome) = &outcome {
            shared
                .metrics
                .images
                .with_label_values(&[model, outcome.features_from])
                .inc();
        }
        let _ = reply.send(outcome);
    }
}
