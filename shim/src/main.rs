//! containerd-shim-mig-v2: see the `mig_shim` library.

use containerd_shim::Config;
use mig_shim::{RUNTIME_ID, VERSION, shim::MigShim};

fn main() {
    // `-v` is parsed by the shim library but not acted on: answer it before anything else.
    if std::env::args()
        .skip(1)
        .any(|a| a == "-v" || a == "--version")
    {
        println!("containerd-shim-mig-v2 {VERSION}");
        println!("runtime {RUNTIME_ID}, task API v3 (containerd >= 2.0)");
        return;
    }
    // runc runs this binary as the createRuntime hook of a CRIU restore (see `loopback`).
    if std::env::args().nth(1).as_deref() == Some(mig_shim::loopback::HOOK_ARG) {
        std::process::exit(mig_shim::loopback::hook_main());
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("containerd-shim-mig-v2: cannot start the async runtime: {e}");
            std::process::exit(1);
        }
    };
    runtime.block_on(containerd_shim::asynchronous::run::<MigShim>(
        RUNTIME_ID,
        Some(Config::default()),
    ));
}
