//! `weld-edge`, the always-on weld inspection daemon: frame sources, the hybrid rules/model
//! pipeline, the store, MQTT and HTTP. The binary is a thin `main.rs` over [`cli`].

pub mod backend;
pub mod bench;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod deploy;
pub mod http;
pub mod inspect;
pub mod malloc;
pub mod model;
pub mod mqtt;
pub mod pipeline;
pub mod policy;
pub mod service;
pub mod sinks;
pub mod source;
pub mod store;
