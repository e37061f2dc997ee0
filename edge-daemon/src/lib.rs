//! `weld-edge`, the always-on weld inspection daemon: frame sources, the hybrid rules/model
//! pipeline, the store, MQTT and HTTP. The binary is a thin `main.rs` over [`cli`].

pub mod backend;
pub mod cli;
pub mod inspect;
pub mod source;
pub mod store;
