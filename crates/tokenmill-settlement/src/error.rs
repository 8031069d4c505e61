//! The errors of settlement: a contract that does not parse or validate, a
//! ledger that does not verify or cannot be priced, a period outside the
//! term, and arithmetic that would overflow.

use crate::period::Month;
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
    ContractSyntax(#[source] toml::de::Error),
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
    /// A date or time of the contract does not parse or does not exist;
    /// `field` is its path, e.g. `credits[0].granted_at`.
    #[error("contract: {field}: {source}")]
    ContractTime {
        /// The path of the offending field.
        field: String,
        /// What is wrong with its value.
        source: CalendarError,
    },
    /// The requested period is not a month of the contract's term.
    #[error(
        "period: {period} is not a month of the contract's term ({} to {})",
        month_or_blank(.first),
        month_or_blank(.last)
    )]
    OutsideTerm {
        /// The month asked for.
        period: Month,
        /// The term's first month (`None` for a term of no months).
        first: Option<Month>,
        /// The term's last month.
        last: Option<Month>,
    },
    /// The term has no month to settle up to the one asked for.
    #[error("period: {0}: nothing to settle")]
    NothingToSettle(Month),
    /// A figure does not fit in 64-bit micro-units.
    #[error("arithmetic overflow computing {0}")]
    Overflow(&'static str),
}

fn month_or_blank(month: &Option<Month>) -> String {
    month.map_or_else(String::new, |m| m.to_string())
}

/// Why a date (`YYYY-MM-DD`), an instant (`YYYY-MM-DD` or
/// `YYYY-MM-DDTHH:MM:SSZ`, UTC) or a month (`YYYY-MM`) was refused by
/// [`crate::period`]. `text` is always the whole string as given.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CalendarError {
    /// The string does not have the expected shape (fields, separators,
    /// widths): `expected` names it, e.g. `a date YYYY-MM-DD`.
    #[error("{text:?} is not {expected}")]
    Shape {
        /// The string.
        text: String,
        /// What it should have been, in words.
        expected: &'static str,
    },
    /// A field holds something other than ASCII digits.
    #[error("{field} {digits:?} is not a number")]
    NotANumber {
        /// `year`, `month`, `day`, `hour`, `minute` or `second`.
        field: &'static str,
        /// The field's text.
        digits: String,
    },
    /// The month is not 1 to 12.
    #[error("{text:?}: month {month} is not 1 to 12")]
    NoSuchMonth {
        /// The string.
        text: String,
        /// The month it gives.
        month: u32,
    },
    /// The day is 0 or past the end of its month (a 29 February outside a
    /// leap year included).
    #[error("{text:?}: day {day} does not exist in that month")]
    NoSuchDay {
        /// The string.
        text: String,
        /// The day it gives.
        day: u32,
    },
    /// The time of day is past 23:59:59 (leap seconds are not counted).
    #[error("{text:?}: {hour:02}:{minute:02}:{second:02} is not a time of day")]
    NoSuchTime {
        /// The string.
        text: String,
        /// Its hour.
        hour: u32,
        /// Its minute.
        minute: u32,
        /// Its second.
        second: u32,
    },
}
