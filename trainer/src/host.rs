//! Every read of tensor values from the compute device to the host, in `byol-trainer`
//! and `byol-run`, goes through here: each call is one device-to-host transfer (on CUDA
//! a synchronisation of the stream, which waits for every queued kernel), and is
//! counted per thread so tests can hold the training path to zero reads between log
//! steps. A test (`trainer/tests/host_reads.rs`) fails on a `to_scalar` or `to_vec*`
//! anywhere else in those crates' sources.

use std::cell::Cell;

use candle_core::{Device, Result, Tensor, WithDType};

thread_local! {
    static READS: Cell<u64> = const { Cell::new(0) };
}

fn count() {
    READS.with(|r| r.set(r.get() + 1));
}

/// Device-to-host reads made on this thread so far (CPU tensors counted too, so tests
/// on CPU see what a GPU run would pay).
pub fn reads_on_this_thread() -> u64 {
    READS.with(Cell::get)
}

/// The value of a scalar tensor (`Tensor::to_scalar`), counted.
pub fn scalar<T: WithDType>(t: &Tensor) -> Result<T> {
    count();
    t.to_scalar()
}

/// The values of a 1-d tensor (`Tensor::to_vec1`), counted.
pub fn vec1<T: WithDType>(t: &Tensor) -> Result<Vec<T>> {
    count();
    t.to_vec1()
}

/// The rows of a 2-d tensor (`Tensor::to_vec2`), counted.
pub fn vec2<T: WithDType>(t: &Tensor) -> Result<Vec<Vec<T>>> {
    count();
    t.to_vec2()
}

/// A copy of `t` on the CPU (`Tensor::to_device(&Device::Cpu)`), counted.
pub fn to_cpu(t: &Tensor) -> Result<Tensor> {
    count();
    t.to_device(&Device::Cpu)
}
