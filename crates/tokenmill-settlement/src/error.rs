//! The errors of settlement: a contract that does not parse or validate, a
//! ledger that does not verify or cannot be priced, a period outside the
//! term, and arithmetic that would overflow.

use tokenmill_metering::VerifyError;

/// Why a statement could not be made.
#[derive(Debug, thiserror::Error)]
pub enum SettleError {
    /// The contract file could not be read.
    #[error("reading contract {path}: {source}")]
    ContractIo {
        /// The file.
        path: String,
        /// What went wrong.
        source: std::io::Error,
    },
    /// The contract is not valid TOML of the contract's shape (unknown
    /// keys included).
    #[error("contract: {0}")]
    ContractSyntax(String),
    /// A contract value is invalid; `field` is its path, e.g.
    /// `revenue_share[2].bps`.
    #[error("contract: {field}: {message}")]
    Contract {
        /// The path of the offending field.
        field: String,
        /// What is wrong with it.
        message: String,
    },
    /// The ledger does not verify: nothing is settled from it.
    #[error("ledger verification failed: {0}")]
    Verify(#[from] VerifyError),
    /// No checkpoint of the ledger carries the cosignatures asked for, so
    /// nothing can be settled on a witnessed history.
    #[error("no checkpoint of the ledger is cosigned by {min_cosigners} of the witnesses given")]
    NotWitnessed {
        /// The cosignatures asked for.
        min_cosigners: usize,
    },
    /// The ledger changed between verification and reading, or a
    /// checkpoint's root does not match the records read.
    #[error("ledger changed while being read: {0}")]
    Inconsistent(String),
    /// A usage record names a model the price list does not have.
    #[error("record {seq}: model {model:?} has no price in the contract")]
    UnpricedModel {
        /// The record's sequence number.
        seq: u64,
        /// The model.
        model: String,
    },
    /// A record holds a value settlement cannot use.
    #[error("record {seq}: {message}")]
    BadRecord {
        /// The record's sequence number.
        seq: u64,
        /// What is wrong.
        message: String,
    },
    /// A quantity is negative, infinite or not a number.
    #[error("{what}: {value} is not a finite, non-negative quantity")]
    BadQuantity {
        /// The quantity.
        what: &'static str,
        /// Its value.
        value: f64,
    },
    /// The requested period is not a month of the contract's term, or is
    /// not `YYYY-MM`.
    #[error("period: {0}")]
    Period(String),
    /// A figure does not fit in 64-bit micro-units.
    #[error("arithmetic overflow computing {0}")]
    Overflow(&'static str),
}
