//! Revenue-share settlement from tokenmill's signed usage ledger.
//!
//! The deal: an AI cloud pays its hardware backer a share of its revenue at
//! a rate that declines over the contract's term; the backer buys back
//! committed GPU capacity that went unsold, up to a cap; the backer may
//! advance token credits to a tenant and be repaid from that tenant's later
//! cash. Both parties must get the same statement from the same signed
//! ledger, to the last micro-unit, so:
//!
//! - only a ledger that verifies is read, and a statement names the signed
//!   checkpoint (tree size, root) it was computed from ([`source`]);
//! - money is integer micro-units with one stated rounding, half to even,
//!   once per line, and lines sum exactly to totals ([`money`]);
//! - a statement is a pure function of the ledger and the contract: every
//!   month of the term is replayed from the first, against checkpoints
//!   chosen by their signed times, never by a clock ([`statement`]).
//!
//! docs/contract.md describes the contract file, the rules and the
//! statement's JSON, with worked examples that the tests check.
//!
//! ```no_run
//! use tokenmill_metering::VerifierKey;
//! use tokenmill_settlement::{render, settle, source, Contract, Month};
//!
//! /// Prints February's statement from a ledger signed by `keys`.
//! fn print_statement(keys: &[VerifierKey]) -> Result<(), Box<dyn std::error::Error>> {
//!     let contract = Contract::load("contract.toml".as_ref())?;
//!     let ledger = source::load("ledger".as_ref(), keys)?;
//!     let statement = settle(&contract, &ledger, Month::parse("2025-02")?)?;
//!     print!("{}", render::text(&statement));
//!     Ok(())
//! }
//! ```
#![deny(missing_docs)]
#![forbid(unsafe_code)]

pub mod capacity;
pub mod contract;
pub mod credits;
mod error;
pub mod money;
pub mod period;
pub mod pricing;
pub mod render;
pub mod source;
pub mod statement;

pub use contract::{Contract, FundedBy};
pub use error::{CalendarError, SettleError};
pub use period::Month;
pub use source::VerifiedLedger;
pub use statement::{settle, Statement};
