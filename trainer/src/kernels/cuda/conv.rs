//! 2-D convolutions through cuDNN: forward, backward-data (input gradient) and
//! backward-filter (weight gradient), NCHW, f32 or bf16 with f32 accumulation.
//!
//! Per thread and device (cuDNN handles are neither `Send` nor `Sync`) one handle, one
//! plan per shape (descriptors, and for each direction the algorithms cuDNN's heuristics
//! list, ordered and capped by [`crate::kernels::algo_choice`], made on first use; a
//! launch that fails moves to the next) and one workspace, grown to the largest request
//! and reused. fp32 runs with
//! `CUDNN_FMA_MATH` (true fp32) unless TF32 is asked for ([`crate::kernels::set_tf32`]);
//! bf16 with tensor-op math.

use std::cell::RefCell;
use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::rc::Rc;
use std::sync::Arc;

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::DeviceId;
use candle_core::cuda_backend::cudarc::cudnn::{
    ConvBackwardData, ConvBackwardFilter, ConvDescriptor, ConvForward, Cudnn, CudnnDataType,
    FilterDescriptor, TensorDescriptor, sys,
};
use candle_core::cuda_backend::cudarc::cudnn::{CudnnError, result};
use candle_core::cuda_backend::cudarc::driver::CudaSlice;
use candle_core::{CudaDevice, CudaStorage, DType, Layout, Result, bail};
use half::bf16;

use super::{Act, view, with_act};
use crate::kernels::algo_choice::{AlgoChoice, Candidate, workspace_cap};

/// Sizes of one convolution: input `(n, c, h, w)`, weight `(co, c, kh, kw)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct ConvShape {
    pub n: usize,
    pub c: usize,
    pub h: usize,
    pub w: usize,
    pub co: usize,
    pub kh: usize,
    pub kw: usize,
    pub stride: usize,
    pub pad: usize,
}

impl ConvShape {
    /// Output height and width.
    pub fn out_hw(&self) -> (usize, usize) {
        (
            (self.h + 2 * self.pad - self.kh) / self.stride + 1,
            (self.w + 2 * self.pad - self.kw) / self.stride + 1,
        )
    }
}

/// A plan's key: the shape and whether its math is true fp32 (FMA).
type PlanKey = (ConvShape, bool);

/// An activation type cuDNN convolves.
trait ConvType: Act + CudnnDataType {
    const ONE: Self;
    const ZERO: Self;
    /// The state's plans of this type.
    fn plans(plans: &mut Plans) -> &mut HashMap<PlanKey, Plan<Self>>;
}

impl ConvType for f32 {
    const ONE: Self = 1.0;
    const ZERO: Self = 0.0;
    fn plans(plans: &mut Plans) -> &mut HashMap<PlanKey, Plan<Self>> {
        &mut plans.f32
    }
}

impl ConvType for bf16 {
    const ONE: Self = bf16::ONE;
    const ZERO: Self = bf16::ZERO;
    fn plans(plans: &mut Plans) -> &mut HashMap<PlanKey, Plan<Self>> {
        &mut plans.bf16
    }
}

/// Descriptors and algorithm choices of one shape (each direction's made on first use).
struct Plan<T: ConvType> {
    shape: ConvShape,
    math: sys::cudnnMathType_t,
    x: TensorDescriptor<T>,
    w: FilterDescriptor<T>,
    y: TensorDescriptor<T>,
    conv: ConvDescriptor<f32>,
    fwd: Option<AlgoChoice<sys::cudnnConvolutionFwdAlgo_t>>,
    bwd_data: Option<AlgoChoice<sys::cudnnConvolutionBwdDataAlgo_t>>,
    bwd_filter: Option<AlgoChoice<sys::cudnnConvolutionBwdFilterAlgo_t>>,
}

/// Plans by activation type.
#[derive(Default)]
struct Plans {
    f32: HashMap<PlanKey, Plan<f32>>,
    bf16: HashMap<PlanKey, Plan<bf16>>,
}

/// What one thread keeps per device.
struct State {
    handle: Arc<Cudnn>,
    /// A handle of our own for the heuristics' queries (the safe API keeps its handle's
    /// raw pointer to itself).
    query: QueryHandle,
    plans: Plans,
    workspace: Option<CudaSlice<u8>>,
}

/// A raw cuDNN handle, destroyed with it.
struct QueryHandle(sys::cudnnHandle_t);

impl Drop for QueryHandle {
    fn drop(&mut self) {
        // SAFETY: created by `create_handle`, destroyed once, here.
        let _ = unsafe { result::destroy_handle(self.0) };
    }
}

thread_local! {
    static STATES: RefCell<HashMap<DeviceId, Rc<RefCell<State>>>> = RefCell::new(HashMap::new());
}

/// This thread's state for `dev`, made on first use.
fn state(dev: &CudaDevice) -> Result<Rc<RefCell<State>>> {
    STATES.with(|states| {
        if let Some(s) = states.borrow().get(&dev.id()) {
            return Ok(s.clone());
        }
        let handle = Cudnn::new(dev.cuda_stream()).w()?;
        let query = QueryHandle(result::create_handle().w()?);
        let s = Rc::new(RefCell::new(State {
            handle,
            query,
            plans: Plans::default(),
            workspace: None,
        }));
        states.borrow_mut().insert(dev.id(), s.clone());
        Ok(s)
    })
}

/// cuDNN's errors as candle's.
trait Dnn<T> {
    fn w(self) -> Result<T>;
}

impl<T> Dnn<T> for std::result::Result<T, CudnnError> {
    fn w(self) -> Result<T> {
        self.map_err(|e| candle_core::Error::Msg(format!("cuDNN: {e:?}")))
    }
}

/// A size as cuDNN's `int`: its 4-D descriptors address at most 2³¹ − 1 elements a
/// dimension (and a tensor), so a larger one is an error, not a wrapped value.
fn i(v: usize) -> Result<i32> {
    i32::try_from(v).map_err(|_| {
        candle_core::Error::Msg(format!("conv2d: size {v} exceeds cuDNN's 32-bit sizes"))
    })
}

impl<T: ConvType> Plan<T> {
    fn new(handle: &Arc<Cudnn>, shape: &ConvShape, math: sys::cudnnMathType_t) -> Result<Self> {
        use sys::cudnnTensorFormat_t::CUDNN_TENSOR_NCHW as NCHW;
        let (ho, wo) = shape.out_hw();
        for elems in [
            shape.n * shape.c * shape.h * shape.w,
            shape.n * shape.co * ho * wo,
        ] {
            i(elems)?;
        }
        let x = handle
            .create_4d_tensor::<T>(NCHW, [i(shape.n)?, i(shape.c)?, i(shape.h)?, i(shape.w)?])
            .w()?;
        let w = handle
            .create_4d_filter::<T>(
                NCHW,
                [i(shape.co)?, i(shape.c)?, i(shape.kh)?, i(shape.kw)?],
            )
            .w()?;
        let y = handle
            .create_4d_tensor::<T>(NCHW, [i(shape.n)?, i(shape.co)?, i(ho)?, i(wo)?])
            .w()?;
        let mut conv = handle
            .create_conv2d::<f32>(
                [i(shape.pad)?; 2],
                [i(shape.stride)?; 2],
                [1, 1],
                sys::cudnnConvolutionMode_t::CUDNN_CROSS_CORRELATION,
            )
            .w()?;
        conv.set_math_type(math).w()?;
        Ok(Plan {
            shape: *shape,
            math,
            x,
            w,
            y,
            conv,
            fwd: None,
            bwd_data: None,
            bwd_filter: None,
        })
    }
}

/// The math type for `dtype`: bf16 on tensor cores; f32 as true fp32 (FMA) unless TF32.
fn math(dtype: DType) -> sys::cudnnMathType_t {
    match dtype {
        DType::F32 if !crate::kernels::tf32() => sys::cudnnMathType_t::CUDNN_FMA_MATH,
        _ => sys::cudnnMathType_t::CUDNN_TENSOR_OP_MATH,
    }
}

/// Runs `f` with the plan of `shape` for `T` (made on first use) and the thread's state.
fn with_plan<T: ConvType, R>(
    dev: &CudaDevice,
    shape: &ConvShape,
    f: impl FnOnce(&mut Plan<T>, &mut Option<CudaSlice<u8>>, &CudaDevice, &QueryHandle) -> Result<R>,
) -> Result<R> {
    let state = state(dev)?;
    let mut state = state.borrow_mut();
    let State {
        handle,
        query,
        plans,
        workspace,
    } = &mut *state;
    let m = math(T::DTYPE);
    let key = (*shape, m == sys::cudnnMathType_t::CUDNN_FMA_MATH);
    let plan = match T::plans(plans).entry(key) {
        Entry::Occupied(e) => e.into_mut(),
        Entry::Vacant(e) => e.insert(Plan::new(handle, shape, m)?),
    };
    f(plan, workspace, dev, query)
}

/// Raw descriptors of one shape for the heuristics' queries, destroyed with it.
struct QueryDescs {
    x: sys::cudnnTensorDescriptor_t,
    w: sys::cudnnFilterDescriptor_t,
    y: sys::cudnnTensorDescriptor_t,
    conv: sys::cudnnConvolutionDescriptor_t,
}

impl QueryDescs {
    fn new<T: ConvType>(shape: &ConvShape, math: sys::cudnnMathType_t) -> Result<Self> {
        use sys::cudnnTensorFormat_t::CUDNN_TENSOR_NCHW as NCHW;
        let (ho, wo) = shape.out_hw();
        let d = QueryDescs {
            x: result::create_tensor_descriptor().w()?,
            w: result::create_filter_descriptor().w()?,
            y: result::create_tensor_descriptor().w()?,
            conv: result::create_convolution_descriptor().w()?,
        };
        // SAFETY: the descriptors were just created and are destroyed only by Drop.
        unsafe {
            result::set_tensor4d_descriptor(
                d.x,
                NCHW,
                T::DATA_TYPE,
                [i(shape.n)?, i(shape.c)?, i(shape.h)?, i(shape.w)?],
            )
            .w()?;
            result::set_filter4d_descriptor(
                d.w,
                T::DATA_TYPE,
                NCHW,
                [i(shape.co)?, i(shape.c)?, i(shape.kh)?, i(shape.kw)?],
            )
            .w()?;
            result::set_tensor4d_descriptor(
                d.y,
                NCHW,
                T::DATA_TYPE,
                [i(shape.n)?, i(shape.co)?, i(ho)?, i(wo)?],
            )
            .w()?;
            result::set_convolution2d_descriptor(
                d.conv,
                i(shape.pad)?,
                i(shape.pad)?,
                i(shape.stride)?,
                i(shape.stride)?,
                1,
                1,
                sys::cudnnConvolutionMode_t::CUDNN_CROSS_CORRELATION,
                sys::cudnnDataType_t::CUDNN_DATA_FLOAT,
            )
            .w()?;
            result::set_convolution_math_type(d.conv, math).w()?;
        }
        Ok(d)
    }
}

impl Drop for QueryDescs {
    fn drop(&mut self) {
        // SAFETY: each was created in `new` and is destroyed once, here.
        unsafe {
            let _ = result::destroy_tensor_descriptor(self.x);
            let _ = result::destroy_filter_descriptor(self.w);
            let _ = result::destroy_tensor_descriptor(self.y);
            let _ = result::destroy_convolution_descriptor(self.conv);
        }
    }
}

/// The runnable candidates cuDNN's heuristics list for `$plan`'s shape in one direction
/// (`$get`: `cudnnGetConvolution*Algorithm_v7` taking the query handle, the descriptors
/// `$d` names in `$args` order, and `$n` records of `$perf`), in its order: status
/// success and the plan's math type.
macro_rules! heuristics {
    ($plan:expr, $query:expr, $perf:ty, $n:expr, $get:path, |$d:ident| ($($arg:ident),+)) => {{
        let $d = QueryDescs::new::<T>(&$plan.shape, $plan.math)?;
        const N: usize = $n as usize;
        let mut count = 0;
        // SAFETY: zeroed perf records are valid; cuDNN fills `count` of them.
        let mut perf: [$perf; N] = unsafe { std::mem::zeroed() };
        // SAFETY: the handle and descriptors are alive; `perf` holds N records.
        unsafe { $get($query.0, $($d.$arg),+, N as i32, &mut count, perf.as_mut_ptr()) }.w()?;
        Ok(perf[..count.max(0) as usize]
            .iter()
            .filter(|p| {
                p.status == sys::cudnnStatus_t::CUDNN_STATUS_SUCCESS && p.mathType == $plan.math
            })
            .map(|p| Candidate {
                algo: p.algo,
                workspace: p.memory,
                deterministic: p.determinism == sys::cudnnDeterminism_t::CUDNN_DETERMINISTIC,
            })
            .collect::<Vec<_>>())
    }};
}

/// The algorithm choice of one direction of `plan`'s shape: cuDNN's whole heuristic
/// list (`_v7`), ordered and capped by [`AlgoChoice::new`].
fn choose<A: Copy>(
    dev: &CudaDevice,
    shape: &ConvShape,
    direction: &str,
    query: impl FnOnce() -> Result<Vec<Candidate<A>>>,
) -> Result<AlgoChoice<A>> {
    let listed = query()?;
    let (free, _) = dev
        .cuda_stream()
        .context()
        .mem_get_info()
        .map_err(|e| candle_core::Error::Msg(format!("CUDA: {e:?}")))?;
    AlgoChoice::new(listed, workspace_cap(free)).ok_or_else(|| {
        candle_core::Error::Msg(format!(
            "cuDNN lists no {direction} algorithm for {shape:?} within a workspace of {} MiB",
            workspace_cap(free) >> 20
        ))
    })
}

/// Runs `launch` with the choice's current candidate and a workspace for it; a failed
/// launch (or workspace allocation) moves the choice to the next candidate and tries
/// again; the last error when none is left.
fn launch_with<A: Copy>(
    choice: &mut AlgoChoice<A>,
    ws: &mut Option<CudaSlice<u8>>,
    dev: &CudaDevice,
    mut launch: impl FnMut(A, Option<&mut CudaSlice<u8>>) -> Result<()>,
) -> Result<()> {
    loop {
        let Some(c) = choice.current() else {
            bail!("conv2d: every algorithm cuDNN offered failed")
        };
        let outcome = workspace(ws, c.workspace, dev).and_then(|w| launch(c.algo, w));
        match outcome {
            Ok(()) => return Ok(()),
            Err(e) if !choice.fail() => return Err(e),
            Err(_) => {}
        }
    }
}

/// The workspace, at least `bytes` long (`None` when no workspace is needed).
fn workspace<'a>(
    ws: &'a mut Option<CudaSlice<u8>>,
    bytes: usize,
    dev: &CudaDevice,
) -> Result<Option<&'a mut CudaSlice<u8>>> {
    if bytes == 0 {
        return Ok(None);
    }
    if ws.as_ref().is_none_or(|w| w.len() < bytes) {
        // Drop the old one first, so that the two never coexist.
        *ws = None;
        // SAFETY: cuDNN uses the workspace as scratch; nothing reads it uninitialised.
        *ws = Some(unsafe { dev.alloc::<u8>(bytes) }?);
    }
    Ok(ws.as_mut())
}

/// `y = conv(x, w)`.
pub(crate) fn forward(
    shape: &ConvShape,
    x: (&CudaStorage, &Layout),
    w: (&CudaStorage, &Layout),
) -> Result<CudaStorage> {
    const OP: &str = "conv2d";
    let dev = x.0.device().clone();
    if x.0.dtype() != w.0.dtype() {
        bail!(
            "{OP}: input {:?} and weight {:?} differ",
            x.0.dtype(),
            w.0.dtype()
        )
    }
    let (ho, wo) = shape.out_hw();
    with_act!(x.0.dtype(), OP, |T| {
        let (xv, wv) = (view::<T>(x.0, x.1, OP)?, view::<T>(w.0, w.1, OP)?);
        // SAFETY: cuDNN writes every output element (beta = 0).
        let mut y = unsafe { dev.alloc::<T>(shape.n * shape.co * ho * wo) }?;
        with_plan::<T, _>(&dev, shape, |plan, ws, dev, query| {
            if plan.fwd.is_none() {
                plan.fwd = Some(choose(dev, &plan.shape, "forward", || {
                    heuristics!(
                        plan,
                        query,
                        sys::cudnnConvolutionFwdAlgoPerf_t,
                        sys::cudnnConvolutionFwdAlgo_t::CUDNN_CONVOLUTION_FWD_ALGO_COUNT,
                        result::get_convolution_forward_algorithm,
                        |d| (x, w, conv, y)
                    )
                })?);
            }
            let op = ConvForward {
                conv: &plan.conv,
                x: &plan.x,
                w: &plan.w,
                y: &plan.y,
            };
            let choice = plan.fwd.as_mut().expect("chosen above");
            launch_with(choice, ws, dev, |algo, ws| {
                // SAFETY: the views and `y` have the descriptors' types and sizes.
                unsafe { op.launch(algo, ws, (T::ONE, T::ZERO), &xv, &wv, &mut y) }.w()
            })
        })?;
        Ok(CudaStorage::wrap_cuda_slice(y, dev))
    })
}

/// The input gradient `(n, c, h, w)` from the weight and the output gradient `g`.
pub(crate) fn backward_data(
    shape: &ConvShape,
    w: (&CudaStorage, &Layout),
    g: (&CudaStorage, &Layout),
) -> Result<CudaStorage> {
    const OP: &str = "conv2d_backward_data";
    let dev = w.0.device().clone();
    with_act!(g.0.dtype(), OP, |T| {
        let (wv, gv) = (view::<T>(w.0, w.1, OP)?, view::<T>(g.0, g.1, OP)?);
        // SAFETY: cuDNN writes every element (beta = 0).
        let mut dx = unsafe { dev.alloc::<T>(shape.n * shape.c * shape.h * shape.w) }?;
        with_plan::<T, _>(&dev, shape, |plan, ws, dev, query| {
            if plan.bwd_data.is_none() {
                plan.bwd_data = Some(choose(dev, &plan.shape, "backward-data", || {
                    heuristics!(
                        plan,
                        query,
                        sys::cudnnConvolutionBwdDataAlgoPerf_t,
                        sys::cudnnConvolutionBwdDataAlgo_t::CUDNN_CONVOLUTION_BWD_DATA_ALGO_COUNT,
                        result::get_convolution_backward_data_algorithm,
                        |d| (w, y, conv, x)
                    )
                })?);
            }
            let op = ConvBackwardData {
                conv: &plan.conv,
                dx: &plan.x,
                w: &plan.w,
                dy: &plan.y,
            };
            let choice = plan.bwd_data.as_mut().expect("chosen above");
            launch_with(choice, ws, dev, |algo, ws| {
                // SAFETY: the views and `dx` have the descriptors' types and sizes.
                unsafe { op.launch(algo, ws, (T::ONE, T::ZERO), &mut dx, &wv, &gv) }.w()
            })
        })?;
        Ok(CudaStorage::wrap_cuda_slice(dx, dev))
    })
}

/// The weight gradient `(co, c, kh, kw)` from the input `x` and the output gradient `g`.
pub(crate) fn backward_filter(
    shape: &ConvShape,
    x: (&CudaStorage, &Layout),
    g: (&CudaStorage, &Layout),
) -> Result<CudaStorage> {
    const OP: &str = "conv2d_backward_filter";
    let dev = x.0.device().clone();
    with_act!(g.0.dtype(), OP, |T| {
        let (xv, gv) = (view::<T>(x.0, x.1, OP)?, view::<T>(g.0, g.1, OP)?);
        // SAFETY: cuDNN writes every element (beta = 0).
        let mut dw = unsafe { dev.alloc::<T>(shape.co * shape.c * shape.kh * shape.kw) }?;
        with_plan::<T, _>(&dev, shape, |plan, ws, dev, query| {
            if plan.bwd_filter.is_none() {
                plan.bwd_filter = Some(choose(dev, &plan.shape, "backward-filter", || {
                    heuristics!(
                        plan,
                        query,
                        sys::cudnnConvolutionBwdFilterAlgoPerf_t,
                        sys::cudnnConvolutionBwdFilterAlgo_t::CUDNN_CONVOLUTION_BWD_FILTER_ALGO_COUNT,
                        result::get_convolution_backward_filter_algorithm,
                        |d| (x, y, conv, w)
                    )
                })?);
            }
            let op = ConvBackwardFilter {
                conv: &plan.conv,
                x: &plan.x,
                dw: &plan.w,
                dy: &plan.y,
            };
            let choice = plan.bwd_filter.as_mut().expect("chosen above");
            launch_with(choice, ws, dev, |algo, ws| {
                // SAFETY: the views and `dw` have the descriptors' types and sizes.
                unsafe { op.launch(algo, ws, (T::ONE, T::ZERO), &xv, &mut dw, &gv) }.w()
            })
        })?;
        Ok(CudaStorage::wrap_cuda_slice(dw, dev))
    })
}
