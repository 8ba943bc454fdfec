//! Gives the binary (and the test binaries) a run path to the libtorch that tch was built
//! against, so that they run without LD_LIBRARY_PATH. torch-sys exports the folder as
//! DEP_TCH_LIBTORCH_LIB because it declares `links = "tch"`.
fn main() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") else {
        return;
    };
    let lib = std::fs::canonicalize(&lib).unwrap_or_else(|_| lib.into());
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
    // A PyTorch wheel keeps the CUDA runtime libraries that libtorch_cpu.so links in
    // site-packages/nvidia/cu13/lib, beside the torch folder.
    if let Some(site) = lib.parent().and_then(|torch| torch.parent()) {
        let cuda = site.join("nvidia/cu13/lib");
        if cuda.is_dir() {
            println!("cargo:rustc-link-arg=-Wl,-rpath,{}", cuda.display());
        }
    }
}
