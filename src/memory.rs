//! What a run needs in memory, measured the way it matters.
//!
//! The process's peak resident size (`VmHWM`) counts two different things:
//! anonymous memory (heap: batches, heads, the manifest), which the run
//! needs, and file-backed pages of the memory-mapped feature shards, which
//! are page cache the kernel can drop at any time and that lazarus releases
//! as it reads on (`FeatureSet`'s resident limit). A burst of mapped pages
//! can make `VmHWM` several times what the run needs, so runs report the two
//! peaks separately ([`MemorySampler`]: `/proc/self/status` sampled every
//! few milliseconds, plus the peaks at start and end), and, inside a memory
//! cgroup with a limit, the cgroup's own peak and limit ([`cgroup_memory`]),
//! which is what the kernel enforces.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Parses a memory size as `train --memory-budget` and sweep files write
/// it: `4GiB`, `512MiB`, `64KiB`, `1000000` or `1000000B` (bytes).
pub fn parse_bytes(text: &str) -> Result<u64, String> {
    let trimmed = text.trim();
    let split = trimmed
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(trimmed.len());
    let (number, unit) = trimmed.split_at(split);
    let number: u64 = number
        .parse()
        .map_err(|e| format!("memory size {trimmed:?}: {e}"))?;
    let scale: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        other => {
            return Err(format!(
                "unknown memory unit {other:?} in {trimmed:?}: use B, KiB, MiB or GiB"
            ));
        }
    };
    number
        .checked_mul(scale)
        .ok_or_else(|| format!("memory size {trimmed:?} is too large"))
}

/// Resident memory of this process now, from `/proc/self/status`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Resident {
    /// `RssAnon`: heap and stacks.
    pub anonymous_bytes: u64,
    /// `RssFile` + `RssShmem`: mapped files (the feature shards, the binary).
    pub file_backed_bytes: u64,
    /// `VmHWM`: the peak of both together since the process started.
    pub peak_rss_bytes: u64,
}

/// Reads `/proc/self/status`; `None` where it does not exist (not Linux).
pub fn resident() -> Option<Resident> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let field = |name: &str| -> Option<u64> {
        let line = status.lines().find(|l| l.starts_with(name))?;
        let kib: u64 = line[name.len()..].split_whitespace().next()?.parse().ok()?;
        Some(kib * 1024)
    };
    Some(Resident {
        anonymous_bytes: field("RssAnon:")?,
        file_backed_bytes: field("RssFile:")? + field("RssShmem:").unwrap_or(0),
        peak_rss_bytes: field("VmHWM:")?,
    })
}

/// What a run reports about its memory.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryReport {
    /// Peak anonymous resident memory: what the run needs.
    pub peak_anonymous_bytes: Option<u64>,
    /// Peak resident pages of mapped files: page cache the kernel reclaims
    /// under pressure, bounded by the run's resident limit.
    pub peak_file_backed_bytes: Option<u64>,
    /// `VmHWM`: both together (what older lazarus reported as peak RSS).
    pub peak_rss_bytes: Option<u64>,
    /// The memory cgroup the process runs in, where it has a limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<CgroupMemory>,
}

/// A memory cgroup with a limit, and its peak usage (every process in it,
/// page cache it was charged for included).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CgroupMemory {
    /// 1 or 2.
    pub version: u8,
    /// Its folder under `/sys/fs/cgroup`.
    pub path: String,
    pub limit_bytes: u64,
    /// `memory.peak` (v2, kernels from 5.19) or `memory.max_usage_in_bytes` (v1).
    pub peak_bytes: Option<u64>,
}

/// Limits at or above this mean "no limit" (v1 writes 2^63 rounded to pages).
const NO_LIMIT: u64 = 1 << 62;

/// The memory cgroup of this process, if it has a memory limit.
pub fn cgroup_memory() -> Option<CgroupMemory> {
    let membership = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let read_u64 = |path: &std::path::Path| -> Option<u64> {
        std::fs::read_to_string(path).ok()?.trim().parse().ok()
    };
    // v1: "N:memory:/path" (the memory controller mounted on its own).
    if let Some(relative) = membership.lines().find_map(|line| {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        controllers
            .split(',')
            .any(|c| c == "memory")
            .then(|| path.to_string())
    }) {
        let dir =
            std::path::Path::new("/sys/fs/cgroup/memory").join(relative.trim_start_matches('/'));
        let limit = read_u64(&dir.join("memory.limit_in_bytes"))?;
        return (limit < NO_LIMIT).then(|| CgroupMemory {
            version: 1,
            path: dir.display().to_string(),
            limit_bytes: limit,
            peak_bytes: read_u64(&dir.join("memory.max_usage_in_bytes")),
        });
    }
    // v2: "0::/path", limit in memory.max ("max" when unlimited).
    let relative = membership
        .lines()
        .find_map(|line| line.strip_prefix("0::"))?
        .trim_start_matches('/');
    let dir = std::path::Path::new("/sys/fs/cgroup").join(relative);
    let limit = read_u64(&dir.join("memory.max"))?;
    (limit < NO_LIMIT).then(|| CgroupMemory {
        version: 2,
        path: dir.display().to_string(),
        limit_bytes: limit,
        peak_bytes: read_u64(&dir.join("memory.peak")),
    })
}

/// Samples anonymous and file-backed resident memory from a background
/// thread until `finish`: peaks shorter than the interval can slip between
/// samples (`VmHWM` still catches them, together).
pub struct MemorySampler {
    stop: Arc<AtomicBool>,
    anonymous: Arc<AtomicU64>,
    file_backed: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl MemorySampler {
    /// Starts sampling every `interval`; where `/proc` is missing it samples nothing.
    pub fn start(interval: Duration) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let anonymous = Arc::new(AtomicU64::new(0));
        let file_backed = Arc::new(AtomicU64::new(0));
        let sample = {
            let (anonymous, file_backed) = (Arc::clone(&anonymous), Arc::clone(&file_backed));
            move || {
                if let Some(now) = resident() {
                    anonymous.fetch_max(now.anonymous_bytes, Ordering::Relaxed);
                    file_backed.fetch_max(now.file_backed_bytes, Ordering::Relaxed);
                }
            }
        };
        sample();
        let thread = resident().is_some().then(|| {
            let stop = Arc::clone(&stop);
            std::thread::Builder::new()
                .name("memory-sampler".into())
                .spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        sample();
                        std::thread::sleep(interval);
                    }
                })
                .expect("a sampler thread starts")
        });
        MemorySampler {
            stop,
            anonymous,
            file_backed,
            thread,
        }
    }

    /// Stops sampling and reports the peaks, `VmHWM` and the cgroup's figures.
    pub fn finish(mut self) -> MemoryReport {
        self.stop_thread();
        self.peaks()
    }

    /// The peaks so far (sampling goes on), `VmHWM` and the cgroup's figures.
    pub fn peaks(&self) -> MemoryReport {
        let now = resident();
        if let Some(now) = now {
            self.anonymous
                .fetch_max(now.anonymous_bytes, Ordering::Relaxed);
            self.file_backed
                .fetch_max(now.file_backed_bytes, Ordering::Relaxed);
        }
        let sampled = |value: &AtomicU64| now.map(|_| value.load(Ordering::Relaxed));
        MemoryReport {
            peak_anonymous_bytes: sampled(&self.anonymous),
            peak_file_backed_bytes: sampled(&self.file_backed),
            peak_rss_bytes: now.map(|n| n.peak_rss_bytes),
            cgroup: cgroup_memory(),
        }
    }

    fn stop_thread(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The process's sampler (`track` starts it), so that a verb's whole life
/// is measured, data loading included.
static PROCESS_SAMPLER: std::sync::OnceLock<MemorySampler> = std::sync::OnceLock::new();

/// How often the process's sampler reads `/proc/self/status` (about 30 µs a read).
const SAMPLE_EVERY: Duration = Duration::from_millis(10);

/// Starts measuring this process's memory, if nothing has yet.
pub fn track() {
    PROCESS_SAMPLER.get_or_init(|| MemorySampler::start(SAMPLE_EVERY));
}

/// This process's memory report so far (measuring from now if `track` was not called).
pub fn process_report() -> MemoryReport {
    PROCESS_SAMPLER
        .get_or_init(|| MemorySampler::start(SAMPLE_EVERY))
        .peaks()
}

impl Drop for MemorySampler {
    fn drop(&mut self) {
        self.stop_thread();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_sizes_parse_with_binary_units_or_as_bytes() {
        assert_eq!(parse_bytes("1GiB"), Ok(1 << 30));
        assert_eq!(parse_bytes("512MiB"), Ok(512 << 20));
        assert_eq!(parse_bytes("64KiB"), Ok(64 << 10));
        assert_eq!(parse_bytes("1000"), Ok(1000));
        assert_eq!(parse_bytes("1000B"), Ok(1000));
        let error = parse_bytes("4GB").unwrap_err();
        assert!(error.contains("unknown memory unit"), "{error}");
        assert!(parse_bytes("GiB").unwrap_err().contains("memory size"));
    }

    #[test]
    fn an_allocation_shows_in_the_anonymous_peak_not_the_file_backed_one() {
        let sampler = MemorySampler::start(Duration::from_millis(1));
        // 64 MiB written page by page, held across a few samples.
        let block = vec![1u8; 64 << 20];
        std::thread::sleep(Duration::from_millis(30));
        let during = resident().unwrap();
        assert_eq!(
            block
                .iter()
                .step_by(4096)
                .map(|&b| b as usize)
                .sum::<usize>(),
            16384
        );
        drop(block);
        let report = sampler.finish();
        let anonymous = report.peak_anonymous_bytes.unwrap();
        assert!(during.anonymous_bytes >= 64 << 20, "{during:?}");
        // Against the block, not `during`: other tests of this process
        // allocate and free between two samples, so the sampled peak may
        // miss their share of the moment `during` was read.
        assert!(anonymous >= 64 << 20, "{anonymous} vs {during:?}");
        assert!(report.peak_rss_bytes.unwrap() >= 64 << 20);
    }
}
