//! A witness for tokenmill ledgers, speaking the C2SP tlog-witness protocol.
//!
//! The cloud signs its own ledger's checkpoints; a cloud that kept two
//! ledgers could sign both. A witness run by someone else (the hardware
//! backer) closes that door: it keeps, per ledger, the latest checkpoint it
//! cosigned, and cosigns a new one only when the ledger's key signed it and a
//! Merkle consistency proof shows it extends that latest one. Of two
//! diverging histories, at most one gets the witness's cosignature.
//!
//! - [`request`] reads an `add-checkpoint` body (old size, proof, note).
//! - [`store`] keeps the latest cosigned size and root per ledger, durably
//!   (synced to disk before the witness answers).
//! - [`Witness`] makes the checks in the protocol's order and answers with a
//!   cosignature or the protocol's refusal ([`AddError`], with its HTTP
//!   status).
//! - [`http`] serves it (`POST /add-checkpoint`).
#![deny(missing_docs)]
#![forbid(unsafe_code)]

pub mod http;
pub mod request;
pub mod store;
pub mod submit;
mod witness;

pub use witness::{AddError, Witness};
