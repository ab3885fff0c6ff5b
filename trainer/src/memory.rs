//! The process's memory policy for training.

/// Keeps freed buffers in the heap for reuse instead of handing them back to the
/// kernel. A training step frees and reallocates its activations (tens of MiB each)
/// every step; with glibc's defaults each one is a fresh `mmap`, so every step pays
/// page faults on zeroed pages again (about a fifth of a CPU step). After this call
/// large allocations come from the heap and stay mapped: resident memory settles at
/// the step's peak and stays there. Call once at start-up, before other threads
/// allocate. Does nothing on other C libraries.
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: `mallopt` only changes allocator parameters; glibc takes its own lock.
    unsafe {
        libc::mallopt(libc::M_MMAP_MAX, 0);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
        libc::mallopt(libc::M_TOP_PAD, 64 << 20);
    }
}
