//! The tokenmill engine: continuous batching over a paged KV cache.
//!
//! [`Engine`] runs the step loop on its own thread (schedule -> forward ->
//! update) and implements the protocol's `EngineClient`, so the server only
//! ever sees validated requests going in and generation events coming out.
//! [`kv`] hands out KV blocks, [`sched`] decides each step, [`sampler`] draws
//! tokens, [`output`] turns them into text.
#![deny(missing_docs)]

pub mod capacity;
mod engine;
pub mod kv;
pub mod output;
pub mod sampler;
pub mod sched;
pub mod telemetry;

pub use engine::{Engine, EngineConfig, EngineStats, SamplerPlace};
pub use sched::SchedulerConfig;
