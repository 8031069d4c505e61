//! The tokenmill engine: continuous batching over a paged KV cache.
//!
//! [`Engine`] runs the step loop on its own thread and implements the
//! protocol's `EngineClient`, so the server only ever sees validated
//! requests going in and generation events coming out. Three parts, each
//! with one job:
//!
//! - [`sched`], the scheduler, knows tokens and blocks only: which sequences
//!   run in a step and how many of their tokens, the KV blocks ([`kv`]) they
//!   hold, fairness between tenants, preemption, and when a sequence ends by
//!   its own tokens (an end-of-generation id, its length limit). It needs no
//!   tokenizer and no client.
//! - [`output_processor`] owns everything a request is beyond its tokens:
//!   detokenizing and stop strings ([`output`]), logprobs, the client's
//!   sink, noticing a client gone, the in-flight place, and the one usage
//!   record each request is billed by, on every path it can end by.
//! - the step loop joins them: commands in, cancelled requests out of the
//!   scheduler, `schedule()`, the model's forward, one draw per sequence
//!   through the model's sampler ([`sampling`]: the same draws on CPU and
//!   GPU), `update_from_output()`, then the output processor, whose stop
//!   strings end sequences in the scheduler.
#![deny(missing_docs)]

pub mod capacity;
mod engine;
mod error;
pub mod kv;
pub mod output;
pub mod output_processor;
pub mod sampling;
pub mod sched;
mod step_loop;
pub mod telemetry;

pub use engine::{Engine, EngineConfig, EngineStats};
pub use error::EngineError;
pub use sched::SchedulerConfig;
