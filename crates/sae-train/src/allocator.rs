//! Tuning of mimalloc, the allocator the `sae` and `xtask` binaries declare: training frees
//! and reallocates the same large activation buffers every step, and mimalloc by default
//! hands memory that stayed free for a second back to the OS, so a later step faults it in
//! again and the kernel zeroes every page (2 MiB at a time with transparent huge pages).
//!
//! Also [`Counting`], a wrapper that counts what an allocator hands out, for measuring the
//! heap of a training step (`cargo xtask step-heap`, the step-memory test).

use libmimalloc_sys::{mi_option_get, mi_option_set, mi_option_t};
use std::alloc::{GlobalAlloc, Layout};
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

/// `mi_option_purge_delay` of mimalloc.h (v3, the version libmimalloc-sys 0.1.49 builds),
/// which the Rust bindings do not name: milliseconds before freed memory goes back to the
/// OS, -1 for never. A test checks that this index holds v3's default, 1000 (options.c).
const PURGE_DELAY: mi_option_t = 15;

/// Keeps memory freed by mimalloc mapped for reuse instead of returning it to the OS, unless
/// `MIMALLOC_PURGE_DELAY` sets the delay; call it first thing in `main`.
///
/// A ResNet-50 training step at 140×140 (batch 16, `xtask bench-train-row`) took 1.90 s with
/// the default delay and 1.67 s without purging (five alternating pairs on a 2-core EPYC), and
/// a 12 s run took 98,000 page faults against 1,300 (`results/train-profile.md`). The cost:
/// resident memory stays at the run's peak, which a training process reaches in its first
/// step anyway.
pub fn keep_freed_memory() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: setting an option is a plain store in mimalloc's option table, valid at any
        // time; an index it does not know is ignored.
        unsafe { mi_option_set(PURGE_DELAY, -1) };
    }
}

/// mimalloc's purge delay now (for tests and logs).
pub fn purge_delay() -> i64 {
    // SAFETY: a read from mimalloc's option table.
    unsafe { mi_option_get(PURGE_DELAY) as i64 }
}

/// An allocator (mimalloc in `xtask`, the system's in a test) counting what it hands out: the
/// bytes live now, the most live since [`measure`] began, and the bytes and allocations made.
/// Heap counts are exact and the same from run to run, where resident memory (VmHWM) moves by
/// the allocator's placement. The counters are per process: declare it as the
/// `#[global_allocator]` of a binary, and [`measure`] counts that binary's heap.
pub struct Counting<A>(pub A);

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);
static ALLOCATED: AtomicUsize = AtomicUsize::new(0);
static ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);

fn grew(bytes: usize) {
    let live = LIVE.fetch_add(bytes, Relaxed) + bytes;
    PEAK.fetch_max(live, Relaxed);
    ALLOCATED.fetch_add(bytes, Relaxed);
    ALLOCATIONS.fetch_add(1, Relaxed);
}

// SAFETY: every call goes to the wrapped allocator unchanged; the counters only observe.
unsafe impl<A: GlobalAlloc> GlobalAlloc for Counting<A> {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { self.0.alloc(layout) };
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { self.0.alloc_zeroed(layout) };
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, layout: Layout) {
        unsafe { self.0.dealloc(p, layout) };
        LIVE.fetch_sub(layout.size(), Relaxed);
    }
    unsafe fn realloc(&self, p: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let q = unsafe { self.0.realloc(p, layout, new_size) };
        if !q.is_null() {
            LIVE.fetch_sub(layout.size(), Relaxed);
            grew(new_size);
        }
        q
    }
}

/// What the heap did while a closure ran, in bytes (all zero unless [`Counting`] is the
/// process's global allocator).
#[derive(Debug, Clone, Copy)]
pub struct HeapUse {
    /// Live when it began.
    pub before: usize,
    /// The most live at once while it ran.
    pub peak: usize,
    /// Live when it ended.
    pub after: usize,
    /// Allocated in all while it ran (a buffer allocated twice counts twice).
    pub allocated: usize,
    /// Allocations made while it ran.
    pub allocations: usize,
}

/// Runs `f`, counting its use of the heap (every thread's: run nothing else meanwhile).
pub fn measure<R>(f: impl FnOnce() -> R) -> (HeapUse, R) {
    let before = LIVE.load(Relaxed);
    PEAK.store(before, Relaxed);
    let (allocated, allocations) = (ALLOCATED.load(Relaxed), ALLOCATIONS.load(Relaxed));
    let r = f();
    let heap = HeapUse {
        before,
        peak: PEAK.load(Relaxed),
        after: LIVE.load(Relaxed),
        allocated: ALLOCATED.load(Relaxed) - allocated,
        allocations: ALLOCATIONS.load(Relaxed) - allocations,
    };
    (heap, r)
}

#[cfg(test)]
mod tests {
    /// The index names the purge delay: it holds v3's default, 1000 ms (in a process that has
    /// not set it), and setting it takes.
    #[test]
    fn the_purge_delay_option_is_the_one_set() {
        if std::env::var_os("MIMALLOC_PURGE_DELAY").is_some() {
            return;
        }
        assert_eq!(super::purge_delay(), 1000);
        super::keep_freed_memory();
        assert_eq!(super::purge_delay(), -1);
    }
}
