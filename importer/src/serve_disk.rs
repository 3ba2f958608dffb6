//! `importer serve-disk` (also started as `cdi-containerimage-server`): the node-pull
//! disk server, kept in the importer so that an image whose controller calls it by that
//! name still works. The images ship the small `serve-disk` binary (`serve-disk/`)
//! under CDI's name; both run the same code.

use crate::cli::ServeArgs;

pub async fn run(args: ServeArgs) -> i32 {
    ferrydisk_serve_disk::run(ferrydisk_serve_disk::Options {
        port: args.port,
        image_dir: args.image_dir,
        ready_file: args.ready_file,
        done_file: args.done_file,
        root: args.root,
    })
    .await
}
