//! `serve-disk` (installed as `cdi-containerimage-server`, copied to `/shared/server`).

fn main() {
    let opts = match ferrydisk_serve_disk::args::parse(std::env::args_os().skip(1)) {
        Ok(o) => o,
        Err(ferrydisk_serve_disk::UsageError::Help) => {
            println!("{}", ferrydisk_serve_disk::args::USAGE);
            std::process::exit(0);
        }
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(2);
        }
    };
    // One thread: one importer reads one file over loopback.
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .max_blocking_threads(4)
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            ferrydisk_serve_disk::log('E', &format!("starting the runtime: {e}"));
            std::process::exit(1);
        }
    };
    let code = runtime.block_on(ferrydisk_serve_disk::run(opts));
    std::process::exit(code);
}
