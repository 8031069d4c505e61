//! Committed capacity and the backer's buyback of what went unsold.
//!
//! Capacity records measure each device's wall time and busy time per
//! interval; settlement adds them up per month in whole micro-seconds
//! (exact), converts each month's totals once to micro-GPU-hours (rounded
//! half to even), and computes everything else from those integers, so a
//! reader can redo the figures from the statement alone:
//!
//! - idle = wall - sold (not below 0): capacity that was up but not sold;
//! - unsold = min(idle, committed - sold, not below 0): the backer
//!   guarantees the committed capacity only, and only hours that were
//!   actually up and idle (downtime is not unsold capacity);
//! - buyback = min(cap, unsold x price per GPU-hour), rounded once.
//!
//! Each device counts as one GPU.

use crate::contract::{Capacity, Commitment, Term};
use crate::error::SettleError;
use crate::money::{self, MICRO};
use crate::period::Month;
use serde::Serialize;

/// Micro-seconds in a GPU-hour divided by micro-GPU-hours in a GPU-hour.
const MICROS_PER_MICRO_HOUR: i128 = 3600;

/// Capacity measured in one month, in micro-seconds, summed exactly.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Measured {
    /// Wall time of all devices.
    pub wall_us: i64,
    /// Busy time of all devices.
    pub busy_us: i64,
    /// Capacity records counted.
    pub records: u64,
}

impl Measured {
    /// Adds one record's figures.
    pub fn add(&mut self, wall_us: i64, busy_us: i64) -> Result<(), SettleError> {
        self.wall_us = money::add(self.wall_us, wall_us, "wall time")?;
        self.busy_us = money::add(self.busy_us, busy_us, "busy time")?;
        self.records += 1;
        Ok(())
    }

    /// Adds another set of figures.
    pub fn merge(&mut self, other: Measured) -> Result<(), SettleError> {
        self.wall_us = money::add(self.wall_us, other.wall_us, "wall time")?;
        self.busy_us = money::add(self.busy_us, other.busy_us, "busy time")?;
        self.records += other.records;
        Ok(())
    }
}

/// One month's buyback, from its measured capacity.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Buyback {
    /// Capacity records counted.
    pub records: u64,
    /// Wall time, micro-GPU-hours.
    pub wall_micro_gpu_hours: i64,
    /// Busy (sold) time, micro-GPU-hours.
    pub sold_micro_gpu_hours: i64,
    /// Wall minus sold, not below 0.
    pub idle_micro_gpu_hours: i64,
    /// The commitment for the month.
    pub committed_micro_gpu_hours: i64,
    /// Idle capacity the backer buys back: min(idle, committed - sold).
    pub unsold_micro_gpu_hours: i64,
    /// Micro-units per GPU-hour.
    pub price_per_gpu_hour: i64,
    /// `unsold * price / 1,000,000`, rounded half to even.
    pub uncapped: i64,
    /// The month's cap.
    pub cap: i64,
    /// min(uncapped, cap).
    pub buyback: i64,
}

/// The commitment of `month` in micro-GPU-hours: pro-rated by the seconds
/// of the month inside the term.
pub fn committed(capacity: &Capacity, term: &Term, month: Month) -> Result<i64, SettleError> {
    let from = month.start().max(term.start);
    let to = month.end().min(term.end);
    let in_term = i128::from((to - from).max(0));
    let month_seconds = i128::from(month.end() - month.start());
    match capacity.commitment {
        // GPUs x seconds in the term / 3600 x 10^6.
        Commitment::Gpus(n) => {
            money::mul_div(i128::from(n) * in_term, MICRO, 3600, "committed capacity")
        }
        Commitment::GpuHoursPerMonth(h) => money::mul_div(
            i128::from(h) * MICRO,
            in_term,
            month_seconds,
            "committed capacity",
        ),
    }
}

/// The buyback of a month with `measured` capacity.
pub fn buyback(
    capacity: &Capacity,
    committed_micro_gpu_hours: i64,
    measured: Measured,
) -> Result<Buyback, SettleError> {
    let to_hours = |us: i64| {
        money::div_round(i128::from(us), MICROS_PER_MICRO_HOUR)
            .and_then(|h| money::to_i64(h, "GPU-hours"))
    };
    let wall = to_hours(measured.wall_us)?;
    let sold = to_hours(measured.busy_us)?;
    let idle = money::sub(wall, sold, "idle capacity")?.max(0);
    let short = money::sub(committed_micro_gpu_hours, sold, "unsold capacity")?.max(0);
    let unsold = idle.min(short);
    let uncapped = money::mul_div(
        i128::from(unsold),
        i128::from(capacity.buyback_price_per_gpu_hour),
        MICRO,
        "buyback",
    )?;
    Ok(Buyback {
        records: measured.records,
        wall_micro_gpu_hours: wall,
        sold_micro_gpu_hours: sold,
        idle_micro_gpu_hours: idle,
        committed_micro_gpu_hours,
        unsold_micro_gpu_hours: unsold,
        price_per_gpu_hour: capacity.buyback_price_per_gpu_hour,
        uncapped,
        cap: capacity.buyback_cap_per_month,
        buyback: uncapped.min(capacity.buyback_cap_per_month),
    })
}
