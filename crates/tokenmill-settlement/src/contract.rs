//! The contract file: parsed in two stages, first into raw serde structs
//! that refuse unknown keys (a misspelt key must not silently become a
//! default), then validated into a [`Contract`] whose every value has been
//! checked, with errors that name the field. docs/contract.md describes the
//! file; examples/contract.toml is a complete one.

use crate::error::{CalendarError, SettleError};
use crate::money::BPS;
use crate::period::{self, Instant};
use serde::Deserialize;
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawContract {
    id: String,
    currency: String,
    parties: RawParties,
    term: RawTerm,
    revenue_share: Vec<RawShareStep>,
    prices: BTreeMap<String, RawPrice>,
    capacity: Option<RawCapacity>,
    #[serde(default)]
    credits: Vec<RawCredit>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawParties {
    cloud: String,
    backer: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTerm {
    start: String,
    period_months: u32,
    periods: u32,
    grace_hours: u32,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawShareStep {
    from_period: u32,
    bps: u32,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPrice {
    input: i64,
    cached_input: i64,
    output: i64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCapacity {
    gpus: Option<u32>,
    gpu_hours_per_month: Option<i64>,
    buyback_price_per_gpu_hour: i64,
    buyback_cap_per_month: i64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCredit {
    id: String,
    tenant: String,
    amount: i64,
    granted_at: String,
    expires_at: String,
    funded_by: FundedBy,
    #[serde(default)]
    recoupment_bps: u32,
}

/// Who paid for a credit advance.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FundedBy {
    /// The hardware backer: it pays the cloud for what the credit buys and
    /// is repaid from the tenant's later cash (recoupment).
    Backer,
    /// The cloud itself: a discount; nothing moves between the parties.
    Cloud,
}

impl FundedBy {
    /// `backer` or `cloud`.
    pub fn as_str(self) -> &'static str {
        match self {
            FundedBy::Backer => "backer",
            FundedBy::Cloud => "cloud",
        }
    }
}

/// A validated contract.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Contract {
    /// The contract's identifier, printed on statements.
    pub id: String,
    /// ISO 4217 code of the currency all amounts are micro-units of.
    pub currency: String,
    /// The cloud that serves tokens and pays the revenue share.
    pub cloud: String,
    /// The hardware backer that receives the share, buys back capacity and
    /// may fund credit advances.
    pub backer: String,
    /// Term, periods and grace.
    pub term: Term,
    /// Revenue-share steps, by `from_period`, rates never rising.
    pub schedule: Vec<ShareStep>,
    /// Prices by model name.
    pub prices: BTreeMap<String, Price>,
    /// The capacity commitment and its buyback, if the contract has one.
    pub capacity: Option<Capacity>,
    /// Credit advances, in file order.
    pub credits: Vec<Credit>,
}

/// The contract's term: `periods` contract periods of `period_months`
/// calendar months each, from `start`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Term {
    /// The first day, as (year, month, day); day at most 28.
    pub start_date: (i64, u32, u32),
    /// Midnight UTC of the first day.
    pub start: Instant,
    /// The end of the last period (exclusive).
    pub end: Instant,
    /// Calendar months in a contract period.
    pub period_months: u32,
    /// Contract periods in the term.
    pub periods: u32,
    /// How long after a month ends its records may still arrive.
    pub grace_seconds: i64,
}

impl Term {
    /// The first second of contract period `k` (1-based; `periods + 1`
    /// gives the end of the term).
    pub fn period_start(&self, k: u32) -> Instant {
        period::add_months(self.start_date, (k - 1) * self.period_months)
    }

    /// The contract period holding `t`, if `t` is in the term.
    pub fn period_of(&self, t: Instant) -> Option<u32> {
        if t < self.start || t >= self.end {
            return None;
        }
        // Periods are short lists (at most a few hundred): a search by
        // bisection keeps this exact without calendar division.
        let (mut lo, mut hi) = (1u32, self.periods);
        while lo < hi {
            let mid = lo + (hi - lo).div_ceil(2);
            if self.period_start(mid) <= t {
                lo = mid;
            } else {
                hi = mid - 1;
            }
        }
        Some(lo)
    }
}

/// One step of the revenue-share schedule.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ShareStep {
    /// The first contract period (1-based) at this rate.
    pub from_period: u32,
    /// The rate, in basis points of gross revenue.
    pub bps: u32,
}

/// Prices of one model, in micro-units per million tokens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Price {
    /// Prompt tokens computed.
    pub input: i64,
    /// Prompt tokens served from the prefix cache.
    pub cached_input: i64,
    /// Completion tokens.
    pub output: i64,
}

/// How much capacity the cloud committed to per month.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Commitment {
    /// This many GPUs for every hour of the month that is in the term.
    Gpus(u32),
    /// This many GPU-hours per month (pro-rated in a month the term only
    /// partly covers).
    GpuHoursPerMonth(i64),
}

/// Committed capacity and the backer's buyback of what goes unsold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capacity {
    /// The commitment.
    pub commitment: Commitment,
    /// Micro-units per unsold GPU-hour.
    pub buyback_price_per_gpu_hour: i64,
    /// Most the backer pays for one month's unsold capacity.
    pub buyback_cap_per_month: i64,
}

/// A token credit advance to one tenant.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Credit {
    /// Unique within the contract; statements name credits by it.
    pub id: String,
    /// The tenant whose usage it pays for.
    pub tenant: String,
    /// Its face value, in micro-units.
    pub amount: i64,
    /// From when it may be drawn.
    pub granted_at: Instant,
    /// From when it may no longer be drawn.
    pub expires_at: Instant,
    /// Who paid for it.
    pub funded_by: FundedBy,
    /// Share of the tenant's later cash payments that repays the backer,
    /// in basis points (backer-funded credits only).
    pub recoupment_bps: u32,
}

impl Contract {
    /// Reads and validates a contract file.
    pub fn load(path: &Path) -> Result<Contract, SettleError> {
        let text = std::fs::read_to_string(path).map_err(|source| SettleError::ContractIo {
            path: path.display().to_string(),
            source,
        })?;
        Contract::parse(&text)
    }

    /// Parses and validates contract TOML.
    pub fn parse(text: &str) -> Result<Contract, SettleError> {
        let raw: RawContract = toml::from_str(text).map_err(SettleError::ContractSyntax)?;
        validate(raw)
    }

    /// The revenue-share rate of contract period `k`.
    pub fn bps_for_period(&self, k: u32) -> u32 {
        self.schedule
            .iter()
            .take_while(|s| s.from_period <= k)
            .last()
            .map_or(0, |s| s.bps)
    }
}

fn invalid(field: impl Into<String>, message: impl Into<String>) -> SettleError {
    SettleError::Contract {
        field: field.into(),
        message: message.into(),
    }
}

fn bad_time(field: impl Into<String>, source: CalendarError) -> SettleError {
    SettleError::ContractTime {
        field: field.into(),
        source,
    }
}

fn non_empty(field: &str, value: String) -> Result<String, SettleError> {
    if value.trim().is_empty() {
        return Err(invalid(field, "must not be empty"));
    }
    if value.chars().any(char::is_control) {
        return Err(invalid(field, "must not contain control characters"));
    }
    Ok(value)
}

fn non_negative(field: &str, value: i64) -> Result<i64, SettleError> {
    if value < 0 {
        return Err(invalid(field, format!("{value} is negative")));
    }
    Ok(value)
}

fn bps(field: &str, value: u32) -> Result<u32, SettleError> {
    if i128::from(value) > BPS {
        return Err(invalid(field, format!("{value} is above 10000 (100%)")));
    }
    Ok(value)
}

fn validate(raw: RawContract) -> Result<Contract, SettleError> {
    let id = non_empty("id", raw.id)?;
    let currency = raw.currency;
    if currency.len() != 3 || !currency.bytes().all(|b| b.is_ascii_uppercase()) {
        return Err(invalid(
            "currency",
            format!("{currency:?} is not a three-letter ISO 4217 code such as \"USD\""),
        ));
    }
    let cloud = non_empty("parties.cloud", raw.parties.cloud)?;
    let backer = non_empty("parties.backer", raw.parties.backer)?;
    if cloud == backer {
        return Err(invalid("parties.backer", "must differ from parties.cloud"));
    }
    let term = validate_term(raw.term)?;
    let schedule = validate_schedule(raw.revenue_share, term.periods)?;
    if raw.prices.is_empty() {
        return Err(invalid("prices", "must price at least one model"));
    }
    let mut prices = BTreeMap::new();
    for (model, p) in raw.prices {
        let f = |kind: &str| format!("prices.{model:?}.{kind}");
        if model.is_empty() {
            return Err(invalid("prices", "a model name is empty"));
        }
        let price = Price {
            input: non_negative(&f("input"), p.input)?,
            cached_input: non_negative(&f("cached_input"), p.cached_input)?,
            output: non_negative(&f("output"), p.output)?,
        };
        prices.insert(model, price);
    }
    let capacity = raw.capacity.map(validate_capacity).transpose()?;
    let credits = validate_credits(raw.credits)?;
    Ok(Contract {
        id,
        currency,
        cloud,
        backer,
        term,
        schedule,
        prices,
        capacity,
        credits,
    })
}

fn validate_term(raw: RawTerm) -> Result<Term, SettleError> {
    let start_date = period::parse_date(&raw.start).map_err(|e| bad_time("term.start", e))?;
    if start_date.2 > 28 {
        return Err(invalid(
            "term.start",
            "the day must be 1 to 28, so that every period starts on a day every month has",
        ));
    }
    if !(1..=120).contains(&raw.period_months) {
        return Err(invalid("term.period_months", "must be 1 to 120"));
    }
    if !(1..=1200).contains(&raw.periods) {
        return Err(invalid("term.periods", "must be 1 to 1200"));
    }
    if raw.grace_hours > 24 * 366 {
        return Err(invalid("term.grace_hours", "must be at most a year (8784)"));
    }
    let start = period::add_months(start_date, 0);
    let end = period::add_months(start_date, raw.periods * raw.period_months);
    Ok(Term {
        start_date,
        start,
        end,
        period_months: raw.period_months,
        periods: raw.periods,
        grace_seconds: i64::from(raw.grace_hours) * 3600,
    })
}

fn validate_schedule(raw: Vec<RawShareStep>, periods: u32) -> Result<Vec<ShareStep>, SettleError> {
    let Some(first) = raw.first() else {
        return Err(invalid("revenue_share", "must have at least one step"));
    };
    if first.from_period != 1 {
        return Err(invalid(
            "revenue_share[0].from_period",
            format!(
                "is {}: the first step must start at period 1",
                first.from_period
            ),
        ));
    }
    let mut steps: Vec<ShareStep> = Vec::with_capacity(raw.len());
    for (i, s) in raw.iter().enumerate() {
        let rate = bps(&format!("revenue_share[{i}].bps"), s.bps)?;
        if s.from_period > periods {
            return Err(invalid(
                format!("revenue_share[{i}].from_period"),
                format!(
                    "{} is after the last period of the term ({periods})",
                    s.from_period
                ),
            ));
        }
        if let Some(prev) = steps.last() {
            if s.from_period <= prev.from_period {
                return Err(invalid(
                    format!("revenue_share[{i}].from_period"),
                    format!(
                        "{} does not come after the previous step's {}",
                        s.from_period, prev.from_period
                    ),
                ));
            }
            if rate > prev.bps {
                return Err(invalid(
                    format!("revenue_share[{i}].bps"),
                    format!(
                        "{rate} is above the previous step's {}: the share may not rise over the term",
                        prev.bps
                    ),
                ));
            }
        }
        steps.push(ShareStep {
            from_period: s.from_period,
            bps: rate,
        });
    }
    Ok(steps)
}

fn validate_capacity(raw: RawCapacity) -> Result<Capacity, SettleError> {
    let commitment = match (raw.gpus, raw.gpu_hours_per_month) {
        (Some(0), None) => return Err(invalid("capacity.gpus", "must be at least 1")),
        (Some(n), None) => Commitment::Gpus(n),
        (None, Some(h)) if h <= 0 => {
            return Err(invalid("capacity.gpu_hours_per_month", "must be positive"))
        }
        (None, Some(h)) if h > 1_000_000_000 => {
            return Err(invalid(
                "capacity.gpu_hours_per_month",
                "must be at most 1e9",
            ))
        }
        (None, Some(h)) => Commitment::GpuHoursPerMonth(h),
        _ => {
            return Err(invalid(
                "capacity",
                "give exactly one of gpus and gpu_hours_per_month",
            ))
        }
    };
    Ok(Capacity {
        commitment,
        buyback_price_per_gpu_hour: non_negative(
            "capacity.buyback_price_per_gpu_hour",
            raw.buyback_price_per_gpu_hour,
        )?,
        buyback_cap_per_month: non_negative(
            "capacity.buyback_cap_per_month",
            raw.buyback_cap_per_month,
        )?,
    })
}

fn validate_credits(raw: Vec<RawCredit>) -> Result<Vec<Credit>, SettleError> {
    let mut ids = BTreeSet::new();
    let mut credits = Vec::with_capacity(raw.len());
    for (i, c) in raw.into_iter().enumerate() {
        let f = |name: &str| format!("credits[{i}].{name}");
        let id = non_empty(&f("id"), c.id)?;
        if !ids.insert(id.clone()) {
            return Err(invalid(
                f("id"),
                format!("{id:?} is used by an earlier credit"),
            ));
        }
        let tenant = non_empty(&f("tenant"), c.tenant)?;
        if c.amount <= 0 {
            return Err(invalid(
                f("amount"),
                format!("{} is not positive", c.amount),
            ));
        }
        let granted_at =
            period::parse_instant(&c.granted_at).map_err(|e| bad_time(f("granted_at"), e))?;
        let expires_at =
            period::parse_instant(&c.expires_at).map_err(|e| bad_time(f("expires_at"), e))?;
        if expires_at <= granted_at {
            return Err(invalid(f("expires_at"), "must be after granted_at"));
        }
        let recoupment_bps = bps(&f("recoupment_bps"), c.recoupment_bps)?;
        if c.funded_by == FundedBy::Cloud && recoupment_bps != 0 {
            return Err(invalid(
                f("recoupment_bps"),
                "must be 0 for a cloud-funded credit: only the backer recoups",
            ));
        }
        credits.push(Credit {
            id,
            tenant,
            amount: c.amount,
            granted_at,
            expires_at,
            funded_by: c.funded_by,
            recoupment_bps,
        });
    }
    Ok(credits)
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = r#"
id = "t"
currency = "USD"
[parties]
cloud = "c"
backer = "b"
[term]
start = "2025-03-20"
period_months = 2
periods = 4
grace_hours = 0
[[revenue_share]]
from_period = 1
bps = 3000
[[revenue_share]]
from_period = 3
bps = 3000
[prices.m]
input = 1
cached_input = 0
output = 2
"#;

    fn err(text: &str) -> String {
        Contract::parse(text).expect_err("invalid").to_string()
    }

    #[test]
    fn parses_and_places_periods() {
        let c = Contract::parse(BASE).expect("valid");
        let t = &c.term;
        assert_eq!(period::format_instant(t.start), "2025-03-20T00:00:00Z");
        assert_eq!(period::format_instant(t.end), "2025-11-20T00:00:00Z");
        assert_eq!(
            period::format_instant(t.period_start(2)),
            "2025-05-20T00:00:00Z"
        );
        assert_eq!(t.period_of(t.start - 1), None);
        assert_eq!(t.period_of(t.start), Some(1));
        assert_eq!(t.period_of(t.period_start(2) - 1), Some(1));
        assert_eq!(t.period_of(t.period_start(2)), Some(2));
        assert_eq!(t.period_of(t.end - 1), Some(4));
        assert_eq!(t.period_of(t.end), None);
        assert_eq!(c.bps_for_period(2), 3000);
        assert!(c.capacity.is_none() && c.credits.is_empty());
    }

    #[test]
    fn invalid_values_name_their_field() {
        let cases = [
            (BASE.replace("bps = 3000\n[prices", "bps = 3001\n[prices"), "revenue_share[1].bps"),
            (BASE.replace("from_period = 3", "from_period = 1"), "revenue_share[1].from_period"),
            (BASE.replace("from_period = 3", "from_period = 5"), "revenue_share[1].from_period"),
            (BASE.replace("from_period = 1", "from_period = 2"), "revenue_share[0].from_period"),
            (BASE.replace("bps = 3000\n[[", "bps = 10001\n[["), "revenue_share[0].bps"),
            (BASE.replace("USD", "usd"), "currency"),
            (BASE.replace("2025-03-20", "2025-03-29"), "term.start"),
            (BASE.replace("2025-03-20", "2025-02-30"), "term.start"),
            (BASE.replace("period_months = 2", "period_months = 0"), "term.period_months"),
            (BASE.replace("backer = \"b\"", "backer = \"c\""), "parties.backer"),
            (BASE.replace("output = 2", "output = -2"), "prices.\"m\".output"),
            (format!("{BASE}[capacity]\ngpus = 1\ngpu_hours_per_month = 5\nbuyback_price_per_gpu_hour = 1\nbuyback_cap_per_month = 1\n"), "capacity"),
            (format!("{BASE}[capacity]\ngpus = 0\nbuyback_price_per_gpu_hour = 1\nbuyback_cap_per_month = 1\n"), "capacity.gpus"),
            (format!("{BASE}[capacity]\ngpus = 1\nbuyback_price_per_gpu_hour = 1\nbuyback_cap_per_month = -1\n"), "capacity.buyback_cap_per_month"),
        ];
        for (text, field) in cases {
            let e = err(&text);
            assert!(
                e.starts_with(&format!("contract: {field}: ")),
                "{field}: {e}"
            );
        }
    }

    #[test]
    fn credits_are_validated() {
        let credit = |body: &str| {
            format!("{BASE}[[credits]]\nid = \"a\"\ntenant = \"t\"\namount = 5\n{body}")
        };
        let ok = "granted_at = \"2025-04-01\"\nexpires_at = \"2025-05-01T12:00:00Z\"\nfunded_by = \"backer\"\nrecoupment_bps = 100\n";
        let c = Contract::parse(&credit(ok)).expect("valid");
        assert_eq!(
            period::format_instant(c.credits[0].expires_at),
            "2025-05-01T12:00:00Z"
        );
        for (body, field) in [
            (
                ok.replace("2025-05-01T12:00:00Z", "2025-04-01"),
                "credits[0].expires_at",
            ),
            (
                ok.replace("2025-04-01", "2025-04-31"),
                "credits[0].granted_at",
            ),
            (
                ok.replace("\"backer\"", "\"cloud\""),
                "credits[0].recoupment_bps",
            ),
            (ok.replace("100", "10001"), "credits[0].recoupment_bps"),
        ] {
            let e = err(&credit(&body));
            assert!(
                e.starts_with(&format!("contract: {field}: ")),
                "{field}: {e}"
            );
        }
        let twice = format!(
            "{}[[credits]]\nid = \"a\"\ntenant = \"u\"\namount = 1\n{ok}",
            credit(ok)
        );
        assert!(err(&twice).starts_with("contract: credits[1].id: "));
        assert!(err(&credit(&ok.replace("backer", "nobody"))).contains("nobody"));
        assert!(err(&credit(&format!("{ok}extra = 1\n"))).contains("extra"));
    }
}
