//! Typed configurations, one per role, built once from the command line (`cli.rs`,
//! where clap reads every flag and environment variable). Roles take these and call
//! each other through them: a push that imports its source builds an
//! [`ImportConfig`], the upload server's `--push-dest` a [`PushConfig`]; nothing
//! writes an argv to parse it again.

pub mod clone;
pub mod import;
pub mod push;
pub mod upload;
pub mod uploader;

pub use clone::CloneConfig;
pub use import::ImportConfig;
pub use push::PushConfig;
pub use upload::UploadServerConfig;
pub use uploader::UploaderConfig;
