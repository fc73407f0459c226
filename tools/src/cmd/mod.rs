//! The subcommands, one module per command or group of commands; `main.rs` calls their entry
//! points with the parsed flags.

pub mod add;
pub mod build;
pub mod cat;
pub mod convert;
pub mod export;
pub mod gc;
pub mod handover;
pub mod lifecycle;
pub mod manage;
pub mod push;
pub mod snapshotter;
pub mod trace;
pub mod verify;
pub mod vhost;
