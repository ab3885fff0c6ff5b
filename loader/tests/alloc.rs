//! Steady state allocates nothing per batch (a counting global allocator).

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicU64, Ordering};

use byol_loader::Loader;
use common::*;

struct Counting;
static ALLOCS: AtomicU64 = AtomicU64::new(0);

// SAFETY: forwards to the system allocator; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: same contract as ours.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as ours.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: same contract as ours.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

#[test]
fn steady_state_allocates_nothing_per_batch() {
    let dir = tempfile::tempdir().unwrap();
    let path = dataset(dir.path(), 256); // 32 batches of 8 per epoch
    let mut loader = Loader::new(open(&path), augmenter(), config(8, 2), None).unwrap();
    for _ in 0..8 {
        drop(loader.next_batch());
    }
    // Three windows of 6 batches (all inside the first epoch). A per-batch allocation
    // shows in every window; a one-off growth (a channel's waiter list, say) in one at
    // most. So one clean window proves the steady state.
    let windows: Vec<u64> = (0..3)
        .map(|_| {
            let before = ALLOCS.load(Ordering::SeqCst);
            for _ in 0..6 {
                let b = loader.next_batch();
                assert_eq!(b.len(), 8);
            }
            ALLOCS.load(Ordering::SeqCst) - before
        })
        .collect();
    assert!(
        windows.contains(&0),
        "allocations per window of 6 batches: {windows:?}"
    );
    assert!(
        windows.iter().sum::<u64>() <= 4,
        "allocations per window of 6 batches: {windows:?}"
    );
}
