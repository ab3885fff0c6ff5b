//! Steady state: after warm-up, augmenting an image allocates nothing in this crate. The
//! only allocations left are fast_image_resize's per-call coefficient tables (it builds one
//! small `Vec` per output row/column of each pass), which its API gives no way to reuse.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use byol_augment::crop::CropResizer;
use byol_augment::{AugmentConfig, Augmenter, Interpolation, SampleKey, Scratch, ViewOut};

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
fn steady_state_allocates_nothing_beyond_the_resize_coefficients() {
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
    // Warm-up: buffers grow to the largest crop seen.
    for i in 0..60 {
        go(i, &mut s);
    }
    let keys = 1000..1060u64;
    let before = ALLOCS.load(Ordering::Relaxed);
    for i in keys.clone() {
        go(i, &mut s);
    }
    let pipeline = ALLOCS.load(Ordering::Relaxed) - before;

    // The same crops through the resizer alone (warm as well).
    let mut r = CropResizer::new();
    let mut dst = vec![0u8; aug.view_len()];
    let size = aug.size();
    let mut resize_all = |r: &mut CropResizer, keys: std::ops::Range<u64>| {
        for i in keys {
            for p in aug.draw(SampleKey::new(0, 0, i), w, h) {
                r.crop_resize(
                    &img,
                    w,
                    h,
                    p.crop,
                    Interpolation::Bicubic,
                    &mut dst,
                    size,
                    size,
                )
                .unwrap();
            }
        }
    };
    resize_all(&mut r, 0..60);
    let before = ALLOCS.load(Ordering::Relaxed);
    resize_all(&mut r, keys.clone());
    let resize_only = ALLOCS.load(Ordering::Relaxed) - before;
    let n = keys.count() as f64;
    println!(
        "allocations per image: pipeline {}, of which fast_image_resize {}",
        pipeline as f64 / n,
        resize_only as f64 / n
    );
    assert_eq!(
        pipeline, resize_only,
        "the pipeline allocates beyond the resizer"
    );
}
