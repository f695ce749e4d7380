//! With the `cuda` feature, compile Silica's fused kernels (`src/model/cuda/kernels.cu`) to PTX
//! with nvcc (from `CUDA_HOME` or `PATH`), for the compute capability in `CUDA_COMPUTE_CAP`
//! (default 80: FP16 and BF16 need it). Without the feature this does nothing.
use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=src/model/cuda/kernels.cu");
    println!("cargo:rerun-if-changed=src/model/cuda/select.cu");
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    println!("cargo:rerun-if-env-changed=CUDA_HOME");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR")).join("silica_kernels.ptx");
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "80".into());
    let nvcc = match std::env::var_os("CUDA_HOME") {
        Some(home) => PathBuf::from(home).join("bin").join("nvcc"),
        None => PathBuf::from("nvcc"),
    };
    // fused.rs launches the kernels with programmatic dependent launch only where the PTX was
    // built for sm_90 or later (the kernels' `griddepcontrol` instructions are compiled out below).
    println!("cargo:rustc-env=SILICA_KERNELS_CAP={cap}");
    let status = Command::new(&nvcc)
        .args(["--ptx", "-O3", &format!("-arch=compute_{cap}"), "-o"])
        .arg(&out)
        .arg("src/model/cuda/kernels.cu")
        .status()
        .unwrap_or_else(|e| panic!("cannot run {} (set CUDA_HOME or PATH): {e}", nvcc.display()));
    assert!(status.success(), "nvcc failed on src/model/cuda/kernels.cu");
}
