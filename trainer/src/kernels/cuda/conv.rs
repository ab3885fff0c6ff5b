//! 2-D convolutions through cuDNN: forward, backward-data (input gradient) and
//! backward-filter (weight gradient), NCHW, f32 or bf16 with f32 accumulation.
//!
//! Per thread and device (cuDNN handles are neither `Send` nor `Sync`) one handle, one
//! plan per shape (descriptors and the algorithms chosen by cuDNN's heuristics, made on
//! first use) and one workspace, grown to the largest request and reused. fp32 runs with
//! `CUDNN_FMA_MATH` (true fp32) unless TF32 is asked for ([`crate::kernels::set_tf32`]);
//! bf16 with tensor-op math.

use std::cell::RefCell;
use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::rc::Rc;
use std::sync::Arc;

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::DeviceId;
use candle_core::cuda_backend::cudarc::cudnn::CudnnError;
use candle_core::cuda_backend::cudarc::cudnn::{
    ConvBackwardData, ConvBackwardFilter, ConvDescriptor, ConvForward, Cudnn, CudnnDataType,
    FilterDescriptor, TensorDescriptor, sys,
};
use candle_core::cuda_backend::cudarc::driver::CudaSlice;
use candle_core::{CudaDevice, CudaStorage, DType, Layout, Result, bail};
use half::bf16;

use super::{Act, view, with_act};

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

/// Descriptors and chosen algorithms of one shape (algorithms chosen on first use).
struct Plan<T: ConvType> {
    x: TensorDescriptor<T>,
    w: FilterDescriptor<T>,
    y: TensorDescriptor<T>,
    conv: ConvDescriptor<f32>,
    fwd: Option<(sys::cudnnConvolutionFwdAlgo_t, usize)>,
    bwd_data: Option<(sys::cudnnConvolutionBwdDataAlgo_t, usize)>,
    bwd_filter: Option<(sys::cudnnConvolutionBwdFilterAlgo_t, usize)>,
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
    plans: Plans,
    workspace: Option<CudaSlice<u8>>,
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
        let s = Rc::new(RefCell::new(State {
            handle,
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
    f: impl FnOnce(&mut Plan<T>, &mut Option<CudaSlice<u8>>, &CudaDevice) -> Result<R>,
) -> Result<R> {
    let state = state(dev)?;
    let mut state = state.borrow_mut();
    let State {
        handle,
        plans,
        workspace,
    } = &mut *state;
    let m = math(T::DTYPE);
    let key = (*shape, m == sys::cudnnMathType_t::CUDNN_FMA_MATH);
    let plan = match T::plans(plans).entry(key) {
        Entry::Occupied(e) => e.into_mut(),
        Entry::Vacant(e) => e.insert(Plan::new(handle, shape, m)?),
    };
    f(plan, workspace, dev)
}

/// The algorithm of `slot` and its workspace size, chosen by `pick` on first use.
fn chosen<A: Copy>(
    slot: &mut Option<(A, usize)>,
    pick: impl FnOnce() -> Result<(A, usize)>,
) -> Result<(A, usize)> {
    if slot.is_none() {
        *slot = Some(pick()?);
    }
    Ok(slot.expect("set above"))
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
        with_plan::<T, _>(&dev, shape, |plan, ws, dev| {
            let op = ConvForward {
                conv: &plan.conv,
                x: &plan.x,
                w: &plan.w,
                y: &plan.y,
            };
            let (algo, bytes) = chosen(&mut plan.fwd, || {
                let algo = op.pick_algorithm().w()?;
                Ok((algo, op.get_workspace_size(algo).w()?))
            })?;
            let ws = workspace(ws, bytes, dev)?;
            // SAFETY: the views and `y` have the descriptors' types and sizes.
            unsafe { op.launch(algo, ws, (T::ONE, T::ZERO), &xv, &wv, &mut y) }.w()?;
            Ok(())
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
        with_plan::<T, _>(&dev, shape, |plan, ws, dev| {
            let op = ConvBackwardData {
                conv: &plan.conv,
                dx: &plan.x,
                w: &plan.w,
                dy: &plan.y,
            };
            let (algo, bytes) = chosen(&mut plan.bwd_data, || {
                let algo = op.pick_algorithm().w()?;
                Ok((algo, op.get_workspace_size(algo).w()?))
            })?;
            let ws = workspace(ws, bytes, dev)?;
            // SAFETY: the views and `dx` have the descriptors' types and sizes.
            unsafe { op.launch(algo, ws, (T::ONE, T::ZERO), &mut dx, &wv, &gv) }.w()?;
            Ok(())
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
        with_plan::<T, _>(&dev, shape, |plan, ws, dev| {
            let op = ConvBackwardFilter {
                conv: &plan.conv,
                x: &plan.x,
                dw: &plan.w,
                dy: &plan.y,
            };
            let (algo, bytes) = chosen(&mut plan.bwd_filter, || {
                let algo = op.pick_algorithm().w()?;
                Ok((algo, op.get_workspace_size(algo).w()?))
            })?;
            let ws = workspace(ws, bytes, dev)?;
            // SAFETY: the views and `dw` have the descriptors' types and sizes.
            unsafe { op.launch(algo, ws, (T::ONE, T::ZERO), &xv, &mut dw, &gv) }.w()?;
            Ok(())
        })?;
        Ok(CudaStorage::wrap_cuda_slice(dw, dev))
    })
}
