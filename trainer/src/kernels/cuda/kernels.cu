// Our CUDA kernels: BatchNorm (statistics, normalise + ReLU, the two backward reductions,
// the input gradient) and the residual add + ReLU, for f32 and bf16 activations. Every
// sum runs in f32 within a block and f64 across blocks; statistics, affine parameters and
// reductions are f32 whatever the activation type. Compiled to PTX by nvcc in build.rs.
//
// Layout: activations are contiguous (n, c, s) with s = h * w (1 for BatchNorm1d). A
// statistics tensor is (2, c): row 0 the means, row 1 the biased variances.
#include <cuda_bf16.h>
#include <stdint.h>

__device__ __forceinline__ float load(const float* p, int64_t i) { return p[i]; }
__device__ __forceinline__ float load(const __nv_bfloat16* p, int64_t i) { return __bfloat162float(p[i]); }
__device__ __forceinline__ void store(float* p, int64_t i, float v) { p[i] = v; }
__device__ __forceinline__ void store(__nv_bfloat16* p, int64_t i, float v) { p[i] = __float2bfloat16(v); }

// Sums `a` and `b` over the block; thread 0 gets the result. blockDim.x is a multiple of 32
// and at most 1024.
__device__ __forceinline__ void block_sum2(float& a, float& b) {
    __shared__ float sa[32], sb[32];
    for (int o = 16; o > 0; o >>= 1) {
        a += __shfl_down_sync(0xffffffff, a, o);
        b += __shfl_down_sync(0xffffffff, b, o);
    }
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) { sa[warp] = a; sb[warp] = b; }
    __syncthreads();
    int warps = blockDim.x >> 5;
    a = lane < warps ? sa[lane] : 0.f;
    b = lane < warps ? sb[lane] : 0.f;
    if (warp == 0) {
        for (int o = 16; o > 0; o >>= 1) {
            a += __shfl_down_sync(0xffffffff, a, o);
            b += __shfl_down_sync(0xffffffff, b, o);
        }
    }
}

// The element `e` (of n * s) of channel `ch`.
__device__ __forceinline__ int64_t at(int64_t e, int ch, int c, int64_t s) {
    return (e / s * c + ch) * s + e % s;
}

// Sums (a, b) over the block and stores them as block (ch, k)'s partial sums:
// partial[(ch * splits + k) * 2 + {0, 1}].
__device__ __forceinline__ void store_partial(float a, float b, float* partial) {
    block_sum2(a, b);
    if (threadIdx.x == 0) {
        int64_t at = ((int64_t)blockIdx.x * gridDim.y + blockIdx.y) * 2;
        partial[at] = a;
        partial[at + 1] = b;
    }
}

// The partial sums of channel ch over its `splits` blocks, in f64.
__device__ __forceinline__ void sum_partials(const float* partial, int ch, int splits,
                                             double& a, double& b) {
    a = 0;
    b = 0;
    for (int k = 0; k < splits; ++k) {
        a += partial[(ch * splits + k) * 2];
        b += partial[(ch * splits + k) * 2 + 1];
    }
}

// Grid (c, splits): block (ch, k) sums, over its share of channel ch, d = x - x[ch, first]
// and d^2 (shifted so that a large mean does not cancel the variance), into
// partial[(ch * splits + k) * 2 + {0, 1}].
template <typename T>
__device__ void stats_partial(const T* x, float* partial, int c, int64_t count, int64_t s) {
    int ch = blockIdx.x, k = blockIdx.y, splits = gridDim.y;
    int64_t lo = count * k / splits, hi = count * (k + 1) / splits;
    float shift = load(x, at(0, ch, c, s));
    float a = 0.f, b = 0.f;
    for (int64_t e = lo + threadIdx.x; e < hi; e += blockDim.x) {
        float d = load(x, at(e, ch, c, s)) - shift;
        a += d;
        b += d * d;
    }
    store_partial(a, b, partial);
}

// One thread per channel: the partial sums of stats_partial into the mean and the biased
// variance, stats (2, c).
template <typename T>
__device__ void stats_finalize(const T* x, const float* partial, float* stats, int c,
                               int64_t count, int64_t s, int splits) {
    int ch = blockIdx.x * blockDim.x + threadIdx.x;
    if (ch >= c) return;
    double a, b;
    sum_partials(partial, ch, splits, a, b);
    double dm = a / count;
    double var = b / count - dm * dm;
    stats[ch] = (float)(load(x, at(0, ch, c, s)) + dm);
    stats[c + ch] = (float)(var > 0 ? var : 0);
}

// y = (x - mean) * scale + b per channel (scale = w / sqrt(var + eps)), then max(y, 0)
// when relu.
template <typename T>
__device__ void apply(const T* x, const float* w, const float* bias, const float* stats,
                      T* y, int64_t total, int c, int64_t s, float eps, int relu) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total;
         i += (int64_t)gridDim.x * blockDim.x) {
        int ch = (int)(i / s % c);
        float scale = w[ch] * rsqrtf(stats[c + ch] + eps);
        float v = (load(x, i) - stats[ch]) * scale + bias[ch];
        store(y, i, relu && v < 0.f ? 0.f : v);
    }
}

// The gradient reaching the affine output: the ReLU passes it where y > 0.
template <typename T>
__device__ __forceinline__ float through_relu(const T* y, const T* g, int64_t i, int relu) {
    return relu && load(y, i) <= 0.f ? 0.f : load(g, i);
}

// Grid (c, splits): sum g' and g' * (x - mean) over the block's share of channel ch.
template <typename T>
__device__ void grad_partial(const T* x, const T* y, const T* g, const float* stats,
                             float* partial, int c, int64_t count, int64_t s, int relu) {
    int ch = blockIdx.x, k = blockIdx.y, splits = gridDim.y;
    int64_t lo = count * k / splits, hi = count * (k + 1) / splits;
    float m = stats[ch];
    float a = 0.f, b = 0.f;
    for (int64_t e = lo + threadIdx.x; e < hi; e += blockDim.x) {
        int64_t i = at(e, ch, c, s);
        float gi = through_relu(y, g, i, relu);
        a += gi;
        b += gi * (load(x, i) - m);
    }
    store_partial(a, b, partial);
}

// One thread per channel: sums (2, c) = (sum of g', sum of g' * (x - mean)).
extern "C" __global__ void bn_grad_finalize(const float* partial, float* sums, int c, int splits) {
    int ch = blockIdx.x * blockDim.x + threadIdx.x;
    if (ch >= c) return;
    double a, b;
    sum_partials(partial, ch, splits, a, b);
    sums[ch] = (float)a;
    sums[c + ch] = (float)b;
}

// dx = k1 * g' + k2 * x + k3 per channel, with k1 = w * invstd and, for batch statistics,
// k2 = -k1 * invstd^2 * sum(g'(x - m)) / count, k3 = -k1 * sum(g') / count - k2 * m.
template <typename T>
__device__ void grad_input(const T* x, const T* y, const T* g, const float* w,
                           const float* stats, const float* sums, T* gx, int64_t total,
                           int c, int64_t s, float eps, float count, int relu, int batch_stats) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total;
         i += (int64_t)gridDim.x * blockDim.x) {
        int ch = (int)(i / s % c);
        float invstd = rsqrtf(stats[c + ch] + eps);
        float k1 = w[ch] * invstd;
        float v = k1 * through_relu(y, g, i, relu);
        if (batch_stats) {
            // k2 * x + k3 written around the mean, so that a large mean does not cancel.
            float k2 = -k1 * invstd * invstd * sums[c + ch] / count;
            v += k2 * (load(x, i) - stats[ch]) - k1 * sums[ch] / count;
        }
        store(gx, i, v);
    }
}

// y = max(a + b, 0).
template <typename T>
__device__ void add_relu(const T* a, const T* b, T* y, int64_t total) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total;
         i += (int64_t)gridDim.x * blockDim.x) {
        float v = load(a, i) + load(b, i);
        store(y, i, v > 0.f ? v : 0.f);
    }
}

// out = g where y > 0, else 0 (the gradient of both inputs of add_relu).
template <typename T>
__device__ void relu_grad(const T* y, const T* g, T* out, int64_t total) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total;
         i += (int64_t)gridDim.x * blockDim.x) {
        store(out, i, load(y, i) > 0.f ? load(g, i) : 0.f);
    }
}

// The stem's max-pool (3x3, stride 2, padding 1) of planes h x w: the index in its plane
// of the first maximum of output (oy, ox)'s window (PyTorch's rule: a NaN is taken).
template <typename T>
__device__ int pool_argmax(const T* plane, int h, int w, int oy, int ox) {
    int y0 = max(2 * oy - 1, 0), x0 = max(2 * ox - 1, 0);
    int y1 = min(2 * oy + 2, h), x1 = min(2 * ox + 2, w);
    int best = y0 * w + x0;
    float m = load(plane, best);
    for (int iy = y0; iy < y1; ++iy) {
        for (int ix = x0; ix < x1; ++ix) {
            float v = load(plane, iy * w + ix);
            if (v > m || isnan(v)) {
                m = v;
                best = iy * w + ix;
            }
        }
    }
    return best;
}

// One thread per output: y = the window maximum.
template <typename T>
__device__ void max_pool_fwd(const T* x, T* y, int64_t planes, int h, int w, int ho, int wo) {
    int64_t total = planes * ho * wo;
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total;
         i += (int64_t)gridDim.x * blockDim.x) {
        int64_t p = i / (ho * wo);
        int r = (int)(i % (ho * wo));
        const T* plane = x + p * h * w;
        y[i] = plane[pool_argmax(plane, h, w, r / wo, r % wo)];
    }
}

// One thread per input: the sum, in row-major order of the outputs, of the gradients of
// the (at most 2 x 2) outputs whose window holds it and whose first maximum it is. No
// atomics: deterministic, and the CPU kernel's order.
template <typename T>
__device__ void max_pool_bwd(const T* x, const T* g, T* dx, int64_t planes, int h, int w,
                             int ho, int wo) {
    int64_t total = planes * h * w;
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total;
         i += (int64_t)gridDim.x * blockDim.x) {
        int64_t p = i / (h * w);
        int r = (int)(i % (h * w));
        int iy = r / w, ix = r % w;
        const T* plane = x + p * h * w;
        const T* gp = g + p * ho * wo;
        // Outputs oy with 2 oy - 1 <= iy <= 2 oy + 1.
        int oy0 = iy / 2, oy1 = min((iy + 1) / 2, ho - 1);
        int ox0 = ix / 2, ox1 = min((ix + 1) / 2, wo - 1);
        float acc = 0.f;
        for (int oy = oy0; oy <= oy1; ++oy) {
            for (int ox = ox0; ox <= ox1; ++ox) {
                if (pool_argmax(plane, h, w, oy, ox) == r) acc += load(gp, oy * wo + ox);
            }
        }
        store(dx, i, acc);
    }
}

#define INSTANTIATE(T, SUFFIX)                                                                   \
    extern "C" __global__ void bn_stats_partial_##SUFFIX(const T* x, float* partial, int c,      \
                                                         int64_t count, int64_t s) {             \
        stats_partial(x, partial, c, count, s);                                                  \
    }                                                                                            \
    extern "C" __global__ void bn_stats_finalize_##SUFFIX(const T* x, const float* partial,      \
                                                          float* stats, int c, int64_t count,    \
                                                          int64_t s, int splits) {               \
        stats_finalize(x, partial, stats, c, count, s, splits);                                  \
    }                                                                                            \
    extern "C" __global__ void bn_apply_##SUFFIX(const T* x, const float* w, const float* b,     \
                                                 const float* stats, T* y, int64_t total, int c, \
                                                 int64_t s, float eps, int relu) {               \
        apply(x, w, b, stats, y, total, c, s, eps, relu);                                        \
    }                                                                                            \
    extern "C" __global__ void bn_grad_partial_##SUFFIX(const T* x, const T* y, const T* g,      \
                                                        const float* stats, float* partial,      \
                                                        int c, int64_t count, int64_t s,         \
                                                        int relu) {                              \
        grad_partial(x, y, g, stats, partial, c, count, s, relu);                                \
    }                                                                                            \
    extern "C" __global__ void bn_grad_input_##SUFFIX(                                           \
        const T* x, const T* y, const T* g, const float* w, const float* stats,                 \
        const float* sums, T* gx, int64_t total, int c, int64_t s, float eps, float count,      \
        int relu, int batch_stats) {                                                             \
        grad_input(x, y, g, w, stats, sums, gx, total, c, s, eps, count, relu, batch_stats);     \
    }                                                                                            \
    extern "C" __global__ void add_relu_##SUFFIX(const T* a, const T* b, T* y, int64_t total) {  \
        add_relu(a, b, y, total);                                                                \
    }                                                                                            \
    extern "C" __global__ void relu_grad_##SUFFIX(const T* y, const T* g, T* out,               \
                                                  int64_t total) {                               \
        relu_grad(y, g, out, total);                                                             \
    }                                                                                            \
    extern "C" __global__ void max_pool_fwd_##SUFFIX(const T* x, T* y, int64_t planes, int h,   \
                                                     int w, int ho, int wo) {                    \
        max_pool_fwd(x, y, planes, h, w, ho, wo);                                                \
    }                                                                                            \
    extern "C" __global__ void max_pool_bwd_##SUFFIX(const T* x, const T* g, T* dx,             \
                                                     int64_t planes, int h, int w, int ho,       \
                                                     int wo) {                                   \
        max_pool_bwd(x, g, dx, planes, h, w, ho, wo);                                            \
    }

INSTANTIATE(float, f32)
INSTANTIATE(__nv_bfloat16, bf16)
