//! Steady state: after warm-up, augmenting an image allocates nothing (the resampler
//! keeps its coefficient and row buffers in the per-worker `Scratch`).

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use byol_augment::{AugmentConfig, Augmenter, SampleKey, Scratch, ViewOut};

struct Counting;
static ALLOCS: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

#[test]
fn steady_state_allocates_nothing() {
    let aug = Augmenter::new(AugmentConfig::byol(64)).unwrap();
    let (w, h) = (120u32, 90u32);
    let img: Vec<u8> = (0..w * h * 3).map(|i| (i * 7 % 251) as u8).collect();
    let mut s = Scratch::new();
    let (mut a, mut b) = (vec![0f32; aug.view_len()], vec![0f32; aug.view_len()]);
    let (mut ua, mut ub) = (vec![0u8; aug.view_len()], vec![0u8; aug.view_len()]);
    let mut go = |i: u64, s: &mut Scratch| {
        aug.two_views(
            &img,
            w,
            h,
            SampleKey::new(0, 0, i),
            s,
            [
                ViewOut::both(&mut a, &mut ua),
                ViewOut::both(&mut b, &mut ub),
            ],
        )
        .unwrap();
    };
    // Warm-up: the largest crops seen so far size the buffers; the full image is the
    // largest possible crop, so after it nothing grows.
    for i in 0..200 {
        go(i, &mut s);
    }
    let before = ALLOCS.load(Ordering::Relaxed);
    for i in 1000..1060u64 {
        go(i, &mut s);
    }
    assert_eq!(
        ALLOCS.load(Ordering::Relaxed) - before,
        0,
        "allocations in 60 steady-state images"
    );
}
