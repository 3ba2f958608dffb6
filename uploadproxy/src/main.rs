//! `uploadproxy`: CDI's cdi-uploadproxy. Not implemented yet (tracked as its own
//! issue); it refuses to start rather than pretend to proxy uploads.

fn main() {
    eprintln!(
        "uploadproxy: not implemented yet in this ferrydisk build; use CDI's cdi-uploadproxy image"
    );
    std::process::exit(2);
}
