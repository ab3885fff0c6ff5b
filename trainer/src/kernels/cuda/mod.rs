//! Our ops on CUDA: convolutions through cuDNN ([`conv`]) and BatchNorm and the residual
//! add + ReLU as kernels of our own (`kernels.cu`, compiled to PTX by nvcc in build.rs).
//! Activations are f32 or bf16; BatchNorm statistics, affine parameters and reductions are
//! f32. Nothing here reads device memory back to the host.

pub(crate) mod conv;

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    CudaFunction, CudaSlice, CudaView, DeviceRepr, LaunchConfig, PushKernelArg, ValidAsZeroBits,
};
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::op::BackpropOp;
use candle_core::{CudaDevice, CudaStorage, DType, Layout, Result, Storage, Tensor, bail};
use half::bf16;

/// The PTX of `kernels.cu`.
const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/kernels.ptx"));
/// The name the PTX module is loaded under (once per device).
const MODULE: &str = "byol_kernels";
/// Threads per block of every kernel here (a multiple of 32, at most 1024).
const THREADS: u32 = 256;

/// An activation element type our kernels take: f32 or bf16.
pub(crate) trait Act: CudaDType + DeviceRepr + ValidAsZeroBits + Copy + 'static {
    /// The kernels' name suffix.
    const SUFFIX: &'static str;
    /// The candle dtype.
    const DTYPE: DType;
}

impl Act for f32 {
    const SUFFIX: &'static str = "f32";
    const DTYPE: DType = DType::F32;
}

impl Act for bf16 {
    const SUFFIX: &'static str = "bf16";
    const DTYPE: DType = DType::BF16;
}

/// Runs `$body` with `$t` bound to the Rust type of `$dtype` (f32 or bf16).
macro_rules! with_act {
    ($dtype:expr, $op:expr, |$t:ident| $body:expr) => {
        match $dtype {
            DType::F32 => {
                type $t = f32;
                $body
            }
            DType::BF16 => {
                type $t = half::bf16;
                $body
            }
            other => candle_core::bail!("{}: f32 or bf16 activations, not {other:?}", $op),
        }
    };
}
pub(crate) use with_act;

/// The candle device of a CUDA storage.
pub(crate) fn device(s: &CudaStorage) -> candle_core::Device {
    candle_core::Device::Cuda(s.device().clone())
}

/// The elements of a contiguous storage under `layout`.
pub(crate) fn view<'a, T: Act>(
    s: &'a CudaStorage,
    layout: &Layout,
    op: &str,
) -> Result<CudaView<'a, T>> {
    let Some((start, end)) = layout.contiguous_offsets() else {
        bail!("{op}: expected a contiguous tensor")
    };
    Ok(s.as_cuda_slice::<T>()?.slice(start..end))
}

/// `len` uninitialised elements on `dev` (every kernel here writes all of its output).
fn alloc<T: Act>(dev: &CudaDevice, len: usize) -> Result<CudaSlice<T>> {
    // SAFETY: the callers' kernels write every element before anything reads it.
    unsafe { dev.alloc::<T>(len) }
}

/// `(n, c, s)` of a contiguous `(n, c, rest…)` layout.
fn ncs(layout: &Layout, op: &str) -> Result<(usize, usize, usize)> {
    match layout.dims() {
        [n, c, rest @ ..] => Ok((*n, *c, rest.iter().product())),
        dims => bail!("{op}: expected at least 2 dimensions, got {dims:?}"),
    }
}

/// A grid-stride launch over `total` elements.
fn elementwise(total: usize) -> LaunchConfig {
    let blocks = total.div_ceil(THREADS as usize).clamp(1, 132 * 32) as u32;
    LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// A launch of one thread per channel.
fn per_channel(c: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (c.div_ceil(THREADS as usize).max(1) as u32, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Blocks per channel of a reduction over `count` values a channel: enough blocks to fill
/// the GPU (about 4 per SM), none with fewer than 2048 values.
fn splits(c: usize, count: usize) -> usize {
    (1024 / c.max(1)).clamp(1, count.div_ceil(2048).max(1))
}

/// A `(c, splits)` grid of reduction blocks.
fn reduction(c: usize, splits: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (c as u32, splits as u32, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

thread_local! {
    /// Our kernels' functions by device and name, looked up once
    /// ([`CUDA_FUNC_CACHE_ENV`]).
    static FUNCS: std::cell::RefCell<
        std::collections::HashMap<candle_core::cuda_backend::DeviceId, std::collections::HashMap<String, CudaFunction>>,
    > = std::cell::RefCell::new(std::collections::HashMap::new());
}

/// `BYOL_CUDA_FUNC_CACHE=0` looks our kernels up in candle's module on every launch
/// (a lock and `cuModuleGetFunction` each), as before; by default each is looked up once
/// per thread and device. A switch, so one device run measures both.
pub const CUDA_FUNC_CACHE_ENV: &str = "BYOL_CUDA_FUNC_CACHE";

/// The function `name` of our module on `dev`.
fn function(dev: &CudaDevice, name: &str) -> Result<CudaFunction> {
    static CACHE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let cache = *CACHE.get_or_init(|| std::env::var(CUDA_FUNC_CACHE_ENV).as_deref() != Ok("0"));
    let load = || -> Result<CudaFunction> {
        let func = dev.get_or_load_custom_func(name, MODULE, PTX)?;
        Ok((*func).clone())
    };
    if !cache {
        return load();
    }
    FUNCS.with(|funcs| {
        if let Some(f) = funcs.borrow().get(&dev.id()).and_then(|m| m.get(name)) {
            return Ok(f.clone());
        }
        let f = load()?;
        funcs
            .borrow_mut()
            .entry(dev.id())
            .or_default()
            .insert(name.to_owned(), f.clone());
        Ok(f)
    })
}

/// `BYOL_CUDA_EVENT_TRACKING=1` keeps cudarc's event tracking (two CUDA events per
/// allocation, waited on at each free, when several streams are in use); by default it
/// is off: all our work is on candle's one stream.
pub const CUDA_EVENT_TRACKING_ENV: &str = "BYOL_CUDA_EVENT_TRACKING";
/// `BYOL_CUDA_POOL_RELEASE=0` keeps the driver's default memory pool release threshold
/// (0: every synchronise hands the pool's free memory back to the driver, to be
/// allocated again); by default the threshold is the maximum, so freed memory stays in
/// the pool, as PyTorch's caching allocator keeps it.
pub const CUDA_POOL_RELEASE_ENV: &str = "BYOL_CUDA_POOL_RELEASE";

/// Sets up a CUDA device for our step once it is opened: event tracking and the memory
/// pool's release threshold as [`CUDA_EVENT_TRACKING_ENV`] and [`CUDA_POOL_RELEASE_ENV`]
/// say. Returns the settings in words, for the log.
pub fn tune_device(dev: &CudaDevice) -> Result<String> {
    let stream = dev.cuda_stream();
    let ctx = stream.context();
    let tracking = std::env::var(CUDA_EVENT_TRACKING_ENV).as_deref() == Ok("1");
    if !tracking {
        // SAFETY: candle runs everything on one stream, so no allocation is used on
        // another stream than the one it was made on (what the events would order).
        unsafe { ctx.disable_event_tracking() };
    }
    let keep = std::env::var(CUDA_POOL_RELEASE_ENV).as_deref() != Ok("0");
    if keep {
        use candle_core::cuda_backend::cudarc::driver::{result as drv, sys};
        let err = |e: candle_core::cuda_backend::cudarc::driver::DriverError| {
            candle_core::Error::Msg(format!("CUDA memory pool: {e:?}"))
        };
        ctx.bind_to_thread().map_err(err)?;
        // SAFETY: the device handle is the context's; the pool is the device's default
        // one; the attribute takes a u64.
        unsafe {
            let pool = drv::device::get_default_mem_pool(ctx.cu_device()).map_err(err)?;
            let mut threshold = u64::MAX;
            drv::mem_pool::set_attribute(
                pool,
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                (&mut threshold as *mut u64).cast(),
            )
            .map_err(err)?;
        }
    }
    Ok(format!(
        "event tracking {}, memory pool release threshold {}",
        if tracking { "on" } else { "off" },
        if keep {
            "max (freed memory kept)"
        } else {
            "driver default"
        }
    ))
}

/// Launches `$kernel` (from our module, its function looked up once per thread and
/// device) on `$dev` with the arguments in order.
macro_rules! launch {
    ($dev:expr, $kernel:expr, $cfg:expr, $($arg:expr),+ $(,)?) => {{
        let func = function(&$dev, &$kernel)?;
        let stream = $dev.cuda_stream();
        let mut builder = stream.launch_builder(&func);
        $(builder.arg($arg);)+
        // SAFETY: each caller passes the arguments its kernel declares, in order, with
        // buffers of the sizes the kernel indexes (checked by the callers' shape checks).
        unsafe { builder.launch($cfg) }.w()?;
    }};
}

/// Per-channel mean and biased variance of `x (n, c, …)`: `(2, c)` f32 on the device.
pub(crate) fn batch_norm_stats(x: &CudaStorage, lx: &Layout) -> Result<CudaStorage> {
    const OP: &str = "batch_norm_stats";
    let (n, c, s) = ncs(lx, OP)?;
    let dev = x.device().clone();
    let count = n * s;
    let k = splits(c, count);
    let mut partial = alloc::<f32>(&dev, c * k * 2)?;
    let mut stats = alloc::<f32>(&dev, 2 * c)?;
    let (ci, count_i, s_i, k_i) = (c as i32, count as i64, s as i64, k as i32);
    with_act!(x.dtype(), OP, |T| {
        let xv = view::<T>(x, lx, OP)?;
        launch!(
            dev,
            &format!("bn_stats_partial_{}", T::SUFFIX),
            reduction(c, k),
            &xv,
            &mut partial,
            &ci,
            &count_i,
            &s_i
        );
        launch!(
            dev,
            &format!("bn_stats_finalize_{}", T::SUFFIX),
            per_channel(c),
            &xv,
            &partial,
            &mut stats,
            &ci,
            &count_i,
            &s_i,
            &k_i
        );
    });
    Ok(CudaStorage::wrap_cuda_slice(stats, dev))
}

/// The f32 elements of a small contiguous tensor (statistics, affine parameters).
fn f32_view<'a>(s: &'a CudaStorage, l: &Layout, op: &str) -> Result<CudaView<'a, f32>> {
    view::<f32>(s, l, op)
}

/// `y = (x − mean) / √(var + eps) · w + b`, then ReLU when `relu`; `stats (2, c)`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn batch_norm_apply(
    x: (&CudaStorage, &Layout),
    w: (&CudaStorage, &Layout),
    b: (&CudaStorage, &Layout),
    stats: (&CudaStorage, &Layout),
    eps: f64,
    relu: bool,
) -> Result<CudaStorage> {
    const OP: &str = "batch_norm";
    let (n, c, s) = ncs(x.1, OP)?;
    let dev = x.0.device().clone();
    let total = n * c * s;
    let wv = f32_view(w.0, w.1, OP)?;
    let bv = f32_view(b.0, b.1, OP)?;
    let sv = f32_view(stats.0, stats.1, OP)?;
    let (total_i, ci, s_i, eps_f, relu_i) =
        (total as i64, c as i32, s as i64, eps as f32, relu as i32);
    with_act!(x.0.dtype(), OP, |T| {
        let xv = view::<T>(x.0, x.1, OP)?;
        let mut y = alloc::<T>(&dev, total)?;
        launch!(
            dev,
            &format!("bn_apply_{}", T::SUFFIX),
            elementwise(total),
            &xv,
            &wv,
            &bv,
            &sv,
            &mut y,
            &total_i,
            &ci,
            &s_i,
            &eps_f,
            &relu_i
        );
        Ok(CudaStorage::wrap_cuda_slice(y, dev))
    })
}

/// The storage of a tensor that must live on a CUDA device.
fn cuda_storage<'a>(storage: &'a Storage, op: &str) -> Result<&'a CudaStorage> {
    match storage {
        Storage::Cuda(s) => Ok(s),
        _ => bail!("{op}: expected a CUDA tensor"),
    }
}

/// A tensor (no gradient) over a fresh device storage.
fn tensor(storage: CudaStorage, shape: &[usize]) -> Tensor {
    Tensor::from_storage(
        Storage::Cuda(storage),
        shape.to_vec(),
        BackpropOp::none(),
        false,
    )
}

/// BatchNorm's backward reductions: `(2, c)` f32 holding Σ g′ and Σ g′·(x − mean) per
/// channel, `g′` the gradient through the ReLU (where `y > 0`) when `relu`.
pub(crate) fn batch_norm_grad_sums(
    x: &Tensor,
    y: &Tensor,
    g: &Tensor,
    stats: &Tensor,
    relu: bool,
) -> Result<Tensor> {
    const OP: &str = "batch_norm_grad_sums";
    let (xg, lx) = x.storage_and_layout();
    let (yg, ly) = y.storage_and_layout();
    let (gg, lg) = g.storage_and_layout();
    let (sg, ls) = stats.storage_and_layout();
    let (xs, ys, gs, ss) = (
        cuda_storage(&xg, OP)?,
        cuda_storage(&yg, OP)?,
        cuda_storage(&gg, OP)?,
        cuda_storage(&sg, OP)?,
    );
    let (n, c, s) = ncs(lx, OP)?;
    let dev = xs.device().clone();
    let count = n * s;
    let k = splits(c, count);
    let mut partial = alloc::<f32>(&dev, c * k * 2)?;
    let mut sums = alloc::<f32>(&dev, 2 * c)?;
    let sv = f32_view(ss, ls, OP)?;
    let (ci, count_i, s_i, k_i, relu_i) = (c as i32, count as i64, s as i64, k as i32, relu as i32);
    with_act!(xs.dtype(), OP, |T| {
        let (xv, yv, gv) = (
            view::<T>(xs, lx, OP)?,
            view::<T>(ys, ly, OP)?,
            view::<T>(gs, lg, OP)?,
        );
        launch!(
            dev,
            &format!("bn_grad_partial_{}", T::SUFFIX),
            reduction(c, k),
            &xv,
            &yv,
            &gv,
            &sv,
            &mut partial,
            &ci,
            &count_i,
            &s_i,
            &relu_i
        );
    });
    launch!(
        dev,
        "bn_grad_finalize",
        per_channel(c),
        &partial,
        &mut sums,
        &ci,
        &k_i
    );
    Ok(tensor(CudaStorage::wrap_cuda_slice(sums, dev), &[2, c]))
}

/// BatchNorm's input gradient from its backward reductions `sums` (see
/// [`batch_norm_grad_sums`]); `batch_stats` when the statistics came from this batch.
#[allow(clippy::too_many_arguments)]
pub(crate) fn batch_norm_grad_input(
    x: &Tensor,
    y: &Tensor,
    g: &Tensor,
    w: &Tensor,
    stats: &Tensor,
    sums: &Tensor,
    eps: f64,
    relu: bool,
    batch_stats: bool,
) -> Result<Tensor> {
    const OP: &str = "batch_norm_grad_input";
    let (xg, lx) = x.storage_and_layout();
    let (yg, ly) = y.storage_and_layout();
    let (gg, lg) = g.storage_and_layout();
    let (wg, lw) = w.storage_and_layout();
    let (sg, ls) = stats.storage_and_layout();
    let (mg, lm) = sums.storage_and_layout();
    let xs = cuda_storage(&xg, OP)?;
    let (n, c, s) = ncs(lx, OP)?;
    let dev = xs.device().clone();
    let total = n * c * s;
    let wv = f32_view(cuda_storage(&wg, OP)?, lw, OP)?;
    let sv = f32_view(cuda_storage(&sg, OP)?, ls, OP)?;
    let mv = f32_view(cuda_storage(&mg, OP)?, lm, OP)?;
    let (total_i, ci, s_i) = (total as i64, c as i32, s as i64);
    let (eps_f, count_f, relu_i, batch_i) =
        (eps as f32, (n * s) as f32, relu as i32, batch_stats as i32);
    let out = with_act!(xs.dtype(), OP, |T| {
        let xv = view::<T>(xs, lx, OP)?;
        let yv = view::<T>(cuda_storage(&yg, OP)?, ly, OP)?;
        let gv = view::<T>(cuda_storage(&gg, OP)?, lg, OP)?;
        let mut gx = alloc::<T>(&dev, total)?;
        launch!(
            dev,
            &format!("bn_grad_input_{}", T::SUFFIX),
            elementwise(total),
            &xv,
            &yv,
            &gv,
            &wv,
            &sv,
            &mv,
            &mut gx,
            &total_i,
            &ci,
            &s_i,
            &eps_f,
            &count_f,
            &relu_i,
            &batch_i
        );
        CudaStorage::wrap_cuda_slice(gx, dev)
    });
    Ok(tensor(out, lx.dims()))
}

/// `max(a + b, 0)` of two contiguous storages of one shape and dtype.
pub(crate) fn add_relu(
    a: (&CudaStorage, &Layout),
    b: (&CudaStorage, &Layout),
) -> Result<CudaStorage> {
    const OP: &str = "add_relu";
    let dev = a.0.device().clone();
    let total = a.1.shape().elem_count();
    let total_i = total as i64;
    with_act!(a.0.dtype(), OP, |T| {
        let (av, bv) = (view::<T>(a.0, a.1, OP)?, view::<T>(b.0, b.1, OP)?);
        let mut y = alloc::<T>(&dev, total)?;
        launch!(
            dev,
            &format!("add_relu_{}", T::SUFFIX),
            elementwise(total),
            &av,
            &bv,
            &mut y,
            &total_i
        );
        Ok(CudaStorage::wrap_cuda_slice(y, dev))
    })
}

/// Input and weight gradients of a convolution (`x` and `w` as in the forward, `g` the
/// output gradient): the input gradient only when `want_input`.
pub(crate) fn conv2d_grads(
    shape: &conv::ConvShape,
    x: &Tensor,
    w: &Tensor,
    g: &Tensor,
    want_input: bool,
) -> Result<(Option<Tensor>, Tensor)> {
    const OP: &str = "conv2d_backward";
    let (xg, lx) = x.storage_and_layout();
    let (wg, lw) = w.storage_and_layout();
    let (gg, lg) = g.storage_and_layout();
    let (xs, ws, gs) = (
        cuda_storage(&xg, OP)?,
        cuda_storage(&wg, OP)?,
        cuda_storage(&gg, OP)?,
    );
    let gx = if want_input {
        Some(tensor(
            conv::backward_data(shape, (ws, lw), (gs, lg))?,
            lx.dims(),
        ))
    } else {
        None
    };
    let gw = tensor(conv::backward_filter(shape, (xs, lx), (gs, lg))?, lw.dims());
    Ok((gx, gw))
}

/// `g` where `y > 0`, else 0: the gradient of a ReLU output `y`.
pub(crate) fn relu_grad(y: &Tensor, g: &Tensor) -> Result<Tensor> {
    const OP: &str = "relu_grad";
    let (yg, ly) = y.storage_and_layout();
    let (gg, lg) = g.storage_and_layout();
    let ys = cuda_storage(&yg, OP)?;
    let dev = ys.device().clone();
    let total = ly.shape().elem_count();
    let total_i = total as i64;
    let out = with_act!(ys.dtype(), OP, |T| {
        let yv = view::<T>(ys, ly, OP)?;
        let gv = view::<T>(cuda_storage(&gg, OP)?, lg, OP)?;
        let mut out = alloc::<T>(&dev, total)?;
        launch!(
            dev,
            &format!("relu_grad_{}", T::SUFFIX),
            elementwise(total),
            &yv,
            &gv,
            &mut out,
            &total_i
        );
        CudaStorage::wrap_cuda_slice(out, dev)
    });
    Ok(tensor(out, ly.dims()))
}

/// `(planes, h, w, ho, wo)` of the stem max-pool over a contiguous `(n, c, h, w)` layout
/// with output planes of `(ho, wo)`.
fn pool_dims(layout: &Layout, (ho, wo): (usize, usize)) -> Result<(i64, i32, i32, i32, i32)> {
    let (n, c, h, w) = layout.shape().dims4()?;
    Ok(((n * c) as i64, h as i32, w as i32, ho as i32, wo as i32))
}

/// The stem max-pool's forward (3×3, stride 2, padding 1) of a contiguous `(n, c, h, w)`
/// storage into output planes of `out` = `(ho, wo)` (the op's shape).
pub(crate) fn max_pool_forward(
    x: (&CudaStorage, &Layout),
    out: (usize, usize),
) -> Result<CudaStorage> {
    const OP: &str = "max_pool_forward";
    let dev = x.0.device().clone();
    let (planes, h, w, ho, wo) = pool_dims(x.1, out)?;
    let total = planes as usize * ho as usize * wo as usize;
    with_act!(x.0.dtype(), OP, |T| {
        let xv = view::<T>(x.0, x.1, OP)?;
        let mut y = alloc::<T>(&dev, total)?;
        launch!(
            dev,
            &format!("max_pool_fwd_{}", T::SUFFIX),
            elementwise(total),
            &xv,
            &mut y,
            &planes,
            &h,
            &w,
            &ho,
            &wo
        );
        Ok(CudaStorage::wrap_cuda_slice(y, dev))
    })
}

/// The stem max-pool's input gradient from its input `x` and output gradient `g`.
pub(crate) fn max_pool_backward(x: &Tensor, g: &Tensor) -> Result<Tensor> {
    const OP: &str = "max_pool_backward";
    let (xg, lx) = x.storage_and_layout();
    let (gg, lg) = g.storage_and_layout();
    let xs = cuda_storage(&xg, OP)?;
    let dev = xs.device().clone();
    let (_, _, ho, wo) = lg.shape().dims4()?;
    let (planes, h, w, ho, wo) = pool_dims(lx, (ho, wo))?;
    let total = lx.shape().elem_count();
    let out = with_act!(xs.dtype(), OP, |T| {
        let xv = view::<T>(xs, lx, OP)?;
        let gv = view::<T>(cuda_storage(&gg, OP)?, lg, OP)?;
        let mut dx = alloc::<T>(&dev, total)?;
        launch!(
            dev,
            &format!("max_pool_bwd_{}", T::SUFFIX),
            elementwise(total),
            &xv,
            &gv,
            &mut dx,
            &planes,
            &h,
            &w,
            &ho,
            &wo
        );
        CudaStorage::wrap_cuda_slice(dx, dev)
    });
    Ok(tensor(out, lx.dims()))
}
