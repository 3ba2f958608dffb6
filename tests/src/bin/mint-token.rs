//! `mint-token KEY.pem NAMESPACE PVC`: prints an upload token signed like cdi-apiserver's
//! (for the demo and manual testing with a throwaway key).

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 4 {
        eprintln!("usage: mint-token PRIVATE_KEY.pem NAMESPACE PVC");
        std::process::exit(2);
    }
    let pem = std::fs::read(&args[1]).unwrap_or_else(|e| {
        eprintln!("reading {}: {e}", args[1]);
        std::process::exit(1);
    });
    println!(
        "{}",
        ferrydisk_tests::token::mint(
            &pem,
            &ferrydisk_tests::token::Claims::upload(&args[2], &args[3])
        )
    );
}
