//! Reused f32 buffers for the fine-tuning step's activations and gradients.
//!
//! A step of the fine-tuned blocks allocates and frees the same few dozen
//! buffers (hundreds of MB at K 4), and the allocator returned their pages
//! to the OS between steps: perf showed about 8 % of a step's CPU time in
//! page faults and the kernel's page clearing. Buffers given back with
//! [`recycle`] are handed out again by [`zeroed`] and [`with_capacity`], the
//! smallest that holds the request (a step's last, smaller micro-batch
//! reuses the full ones instead of allocating its own); the pool keeps at
//! most [`MAX_BUFFERS`] buffers and [`MAX_BYTES`], dropping the oldest first,
//! so buffers of sizes no longer asked for leave it, and [`release`] empties
//! it when a fine-tuning run ends. A K 4 step at batch 32
//! then allocates only in its first step, and the process's peak stays
//! within the memory plan (662 MB resident against 568 MB without the pool
//! and a plan of 738 MB).
//!
//! [`zeroed`] zeroes what it returns and [`with_capacity`] returns an empty
//! vector; [`overwritten`] skips the zeroing (5 % of a K 4 step) and returns
//! whatever values the buffer held, for callers that write every element
//! before reading any (a product with `Accumulate::Replace`, a depthwise
//! output started from its bias, a transpose), each saying so where it
//! calls it.

use std::collections::VecDeque;
use std::sync::{Mutex, PoisonError};

/// The most buffers the pool keeps (a K 4 step uses about 60).
pub const MAX_BUFFERS: usize = 128;
/// The most bytes the pool keeps.
pub const MAX_BYTES: usize = 1 << 30;
/// Smaller buffers go back to the allocator, which serves them well.
const MIN_FLOATS: usize = 1 << 14;

static FREE: Mutex<VecDeque<Vec<f32>>> = Mutex::new(VecDeque::new());

/// The smallest free pooled buffer with room for `floats`, if any.
fn take(floats: usize) -> Option<Vec<f32>> {
    if floats < MIN_FLOATS {
        return None;
    }
    let mut free = FREE.lock().unwrap_or_else(PoisonError::into_inner);
    let index = free
        .iter()
        .enumerate()
        .filter(|(_, buffer)| buffer.capacity() >= floats)
        .min_by_key(|(_, buffer)| buffer.capacity())
        .map(|(index, _)| index)?;
    free.remove(index)
}

/// `len` zeros, in a pooled buffer where one fits.
pub fn zeroed(len: usize) -> Vec<f32> {
    match take(len) {
        Some(mut buffer) => {
            buffer.clear();
            buffer.resize(len, 0.0);
            buffer
        }
        None => vec![0.0; len],
    }
}

/// `len` values of no particular content (zeros or a pooled buffer's old
/// values), for a caller that writes every element before it reads one.
pub fn overwritten(len: usize) -> Vec<f32> {
    match take(len) {
        Some(mut buffer) => {
            if buffer.len() >= len {
                buffer.truncate(len);
            } else {
                buffer.resize(len, 0.0);
            }
            buffer
        }
        None => vec![0.0; len],
    }
}

/// An empty vector with room for `floats`, pooled where one fits.
pub fn with_capacity(floats: usize) -> Vec<f32> {
    match take(floats) {
        Some(mut buffer) => {
            buffer.clear();
            buffer
        }
        None => Vec::with_capacity(floats),
    }
}

/// A copy of `values`, in a pooled buffer where one fits.
pub fn copied(values: &[f32]) -> Vec<f32> {
    let mut copy = with_capacity(values.len());
    copy.extend_from_slice(values);
    copy
}

/// Gives `buffer` back for reuse (or to the allocator: small buffers, and
/// the oldest pooled ones once the pool is full).
pub fn recycle(buffer: Vec<f32>) {
    let floats = buffer.capacity();
    if floats < MIN_FLOATS || floats * 4 > MAX_BYTES {
        return;
    }
    let mut free = FREE.lock().unwrap_or_else(PoisonError::into_inner);
    let mut bytes: usize = free.iter().map(|b| b.capacity() * 4).sum::<usize>() + floats * 4;
    while !free.is_empty() && (free.len() >= MAX_BUFFERS || bytes > MAX_BYTES) {
        if let Some(oldest) = free.pop_front() {
            bytes -= oldest.capacity() * 4;
        }
    }
    free.push_back(buffer);
}

/// Empties the pool, its buffers back to the allocator (at the end of a
/// fine-tuning run, so what the process does next does not carry them).
pub fn release() {
    FREE.lock().unwrap_or_else(PoisonError::into_inner).clear();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reused_buffers_come_back_zeroed_or_empty_and_the_pool_stays_bounded() {
        let len = MIN_FLOATS * 3;
        let mut dirty = zeroed(len);
        dirty.iter_mut().for_each(|v| *v = 7.0);
        recycle(dirty);
        // Pooled buffers come back zeroed (the dirty one above, unless
        // another test's product took it first) or empty.
        let again = zeroed(len);
        assert!(again.iter().all(|&v| v == 0.0));
        assert_eq!(again.len(), len);
        recycle(again);
        let empty = with_capacity(len - 10);
        assert!(empty.is_empty() && empty.capacity() >= len - 10);
        recycle(empty);
        let sized = overwritten(len + 5);
        assert_eq!(sized.len(), len + 5);
        recycle(sized);
        let values: Vec<f32> = (0..len).map(|i| i as f32).collect();
        assert_eq!(copied(&values), values);
        // A smaller request may get a larger dirty buffer: zeroed to its
        // length. (Other tests' products use the pool too, so which buffer
        // it gets is not asserted.)
        recycle(vec![1.0; MIN_FLOATS * 40]);
        recycle(vec![1.0; MIN_FLOATS * 9]);
        let smaller = zeroed(MIN_FLOATS * 8);
        assert_eq!(smaller.len(), MIN_FLOATS * 8);
        assert!(smaller.iter().all(|&v| v == 0.0));
        for _ in 0..MAX_BUFFERS + 10 {
            recycle(vec![0.0; MIN_FLOATS]);
        }
        {
            let free = FREE.lock().unwrap();
            // Full: bounded (another test may have taken one meanwhile).
            assert!(free.len() <= MAX_BUFFERS && free.len() > MAX_BUFFERS / 2);
            assert!(free.iter().map(|b| b.capacity() * 4).sum::<usize>() <= MAX_BYTES);
        }
        // Emptied (other tests' products may give a buffer or two back at
        // once, never a hundred).
        release();
        assert!(FREE.lock().unwrap().len() < 10);
    }
}
