fn main() -> Result<(), Box<dyn std::error::Error>> {
    // A vendored protoc, so building weft needs nothing from the system.
    // SAFETY: a build script is single-threaded; nothing reads the environment concurrently.
    if std::env::var_os("PROTOC").is_none() {
        unsafe { std::env::set_var("PROTOC", protoc_bin_vendored::protoc_bin_path()?) };
    }
    tonic_prost_build::configure().compile_protos(&["proto/report.proto"], &["proto"])?;
    Ok(())
}
