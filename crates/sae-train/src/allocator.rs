//! Tuning of mimalloc, the allocator the `sae` and `xtask` binaries declare: training frees
//! and reallocates the same large activation buffers every step, and mimalloc by default
//! hands memory that stayed free for a second back to the OS, so a later step faults it in
//! again and the kernel zeroes every page (2 MiB at a time with transparent huge pages).

use libmimalloc_sys::{mi_option_get, mi_option_set, mi_option_t};

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
