//! Compiles the protobuf contract with protox (no system protoc) and writes the
//! descriptor set used by gRPC reflection into OUT_DIR. With the `cuda` feature, also
//! compiles every `.cu` file under `src/` (headers `.cuh` included from `src/`) to PTX for sm_80 and sm_90 with nvcc
//! (`OUT_DIR/<stem>.sm80.ptx`, `.sm90.ptx`), so a kernel that does not compile fails the
//! build; the CUDA backend embeds them and picks one by the device's compute capability.
use std::path::{Path, PathBuf};
use std::process::Command;

/// The architectures we ship PTX for (the driver JIT-compiles it for newer ones).
const CUDA_ARCHS: [u32; 2] = [80, 90];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "proto/multilora/v1/generation.proto",
        "proto/multilora/v1/adapters.proto",
    ];
    for p in &protos {
        println!("cargo:rerun-if-changed={p}");
    }
    let fds = protox::compile(protos, ["proto"])?;
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out_dir.join("multilora_descriptor.bin"),
        prost::Message::encode_to_vec(&fds),
    )?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    if std::env::var_os("CARGO_FEATURE_CUDA").is_some() {
        compile_cuda_kernels(&out_dir)?;
    }
    Ok(())
}

/// nvcc from the toolkit root in CUDA_ROOT / CUDA_PATH / CUDA_HOME, else from PATH.
fn nvcc() -> PathBuf {
    for var in ["CUDA_ROOT", "CUDA_PATH", "CUDA_HOME"] {
        println!("cargo:rerun-if-env-changed={var}");
        if let Some(root) = std::env::var_os(var) {
            let candidate = Path::new(&root).join("bin").join("nvcc");
            if candidate.is_file() {
                return candidate;
            }
        }
    }
    PathBuf::from("nvcc")
}

fn cu_files(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            cu_files(&path, out)?;
        } else if path.extension().is_some_and(|e| e == "cu" || e == "cuh") {
            out.push(path);
        }
    }
    Ok(())
}

fn compile_cuda_kernels(out_dir: &Path) -> Result<(), Box<dyn std::error::Error>> {
    let nvcc = nvcc();
    let mut files = Vec::new();
    cu_files(Path::new("src"), &mut files)?;
    files.sort();
    for file in &files {
        println!("cargo:rerun-if-changed={}", file.display());
    }
    // A folder holding kernels: a `.cu` file added there reruns this script too.
    let mut folders: Vec<&Path> = files.iter().filter_map(|f| f.parent()).collect();
    folders.dedup();
    for folder in folders {
        println!("cargo:rerun-if-changed={}", folder.display());
    }
    // Headers (.cuh) are included (from `src/`), not compiled on their own.
    for file in files
        .iter()
        .filter(|f| f.extension().is_some_and(|e| e == "cu"))
    {
        let stem = file
            .file_stem()
            .and_then(|s| s.to_str())
            .ok_or("bad .cu name")?;
        for arch in CUDA_ARCHS {
            let ptx = out_dir.join(format!("{stem}.sm{arch}.ptx"));
            let output = Command::new(&nvcc)
                .args(["-ptx", "-O3", "-std=c++17", "-lineinfo", "-Isrc"])
                .arg(format!("-arch=compute_{arch}"))
                .arg("-o")
                .arg(&ptx)
                .arg(file)
                .output()
                .map_err(|e| format!("running {} (set CUDA_ROOT): {e}", nvcc.display()))?;
            if !output.status.success() {
                return Err(format!(
                    "nvcc failed on {} for sm_{arch}:\n{}",
                    file.display(),
                    String::from_utf8_lossy(&output.stderr)
                )
                .into());
            }
        }
    }
    Ok(())
}
