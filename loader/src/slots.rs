//! The fixed pool of batch buffers shared by the workers and the consumer.
//!
//! **Invariant (what makes the `unsafe` sound):** a slot holds one batch at a time.
//! While the batch is being filled, each worker writes only the sample ranges of the
//! slots it claimed (distinct sample numbers are claimed by exactly one worker, through
//! an atomic counter), and nobody reads. The worker that brings `filled` to the batch
//! length publishes the slot (AcqRel on `filled`, then a channel send); from then on
//! only the consumer reads, until it recycles the slot by storing the next batch
//! number in `batch` (Release), after which workers may write again.

use std::cell::UnsafeCell;
use std::sync::atomic::{AtomicU64, AtomicUsize};

/// A heap buffer written through raw sub-slices (see the module invariant).
pub(crate) struct RawBuf<T> {
    data: UnsafeCell<Box<[T]>>,
}

// SAFETY: access follows the module invariant: disjoint writes, or reads with no writer.
unsafe impl<T: Send> Sync for RawBuf<T> {}

impl<T: Copy + Default> RawBuf<T> {
    pub fn new(len: usize) -> Self {
        RawBuf {
            data: UnsafeCell::new(vec![T::default(); len].into_boxed_slice()),
        }
    }

    pub fn len(&self) -> usize {
        // SAFETY: the length of the box never changes.
        unsafe { (&(*self.data.get())).len() }
    }

    /// Elements `[start, start + len)`, for writing.
    ///
    /// # Safety
    /// No other reference to these elements may exist while the slice lives.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn slice_mut(&self, start: usize, len: usize) -> &mut [T] {
        assert!(start + len <= self.len());
        // SAFETY: in bounds (checked); exclusivity is the caller's promise.
        unsafe { std::slice::from_raw_parts_mut((*self.data.get()).as_mut_ptr().add(start), len) }
    }

    /// The first `len` elements, for reading.
    ///
    /// # Safety
    /// No writer may be active while the slice lives.
    pub unsafe fn slice(&self, len: usize) -> &[T] {
        assert!(len <= self.len());
        // SAFETY: in bounds (checked); no writer is the caller's promise.
        unsafe { std::slice::from_raw_parts((*self.data.get()).as_ptr(), len) }
    }
}

/// One batch buffer of the pool.
pub(crate) struct Slot {
    /// The global batch number this slot may hold now.
    pub batch: AtomicU64,
    /// Samples written so far.
    pub filled: AtomicUsize,
    /// Epoch of the batch held (written before publishing).
    pub epoch: AtomicU64,
    /// Batch number within its epoch.
    pub index_in_epoch: AtomicU64,
    /// Records in the batch's epoch domain.
    pub domain_records: AtomicU64,
    /// Samples in the batch.
    pub len: AtomicUsize,
    pub view1: RawBuf<f32>,
    pub view2: RawBuf<f32>,
    pub view1_u8: RawBuf<u8>,
    pub view2_u8: RawBuf<u8>,
    pub labels: RawBuf<u32>,
    pub records: RawBuf<u64>,
}

impl Slot {
    /// A slot for batches of `batch_size` views of `f32_len` floats and `u8_len` bytes.
    pub fn new(batch: u64, batch_size: usize, f32_len: usize, u8_len: usize) -> Self {
        Slot {
            batch: AtomicU64::new(batch),
            filled: AtomicUsize::new(0),
            epoch: AtomicU64::new(0),
            index_in_epoch: AtomicU64::new(0),
            domain_records: AtomicU64::new(0),
            len: AtomicUsize::new(0),
            view1: RawBuf::new(batch_size * f32_len),
            view2: RawBuf::new(batch_size * f32_len),
            view1_u8: RawBuf::new(batch_size * u8_len),
            view2_u8: RawBuf::new(batch_size * u8_len),
            labels: RawBuf::new(batch_size),
            records: RawBuf::new(batch_size),
        }
    }
}
