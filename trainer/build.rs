//! With the `cuda` feature, compiles our CUDA kernels (`src/kernels/cuda/kernels.cu`) to
//! PTX with nvcc, so that a broken kernel fails the build. The PTX targets
//! `compute_$CUDA_COMPUTE_CAP` (default 80: Ampere and later JIT it; bf16 needs 8.0).

use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=src/kernels/cuda/kernels.cu");
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    println!("cargo:rerun-if-env-changed=NVCC");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "80".into());
    let nvcc = std::env::var("NVCC").unwrap_or_else(|_| "nvcc".into());
    let ptx = out.join("kernels.ptx");
    let status = Command::new(&nvcc)
        .args(["--ptx", "-O3", "-std=c++17"])
        .arg(format!("-arch=compute_{cap}"))
        .arg("src/kernels/cuda/kernels.cu")
        .arg("-o")
        .arg(&ptx)
        .status()
        .unwrap_or_else(|e| {
            panic!("cannot run {nvcc} (the cuda feature needs the CUDA toolkit): {e}")
        });
    assert!(
        status.success(),
        "nvcc failed on src/kernels/cuda/kernels.cu"
    );
}
