//! A period's statement, computed from the start of the term.
//!
//! Credits, recoupment and late capacity carry state from one month to the
//! next, so [`settle`] replays every month of the term from the first up to
//! the one asked for, each against its own cutoff checkpoint, and returns
//! the last. The statement of a month is thereby a pure function of the
//! ledger's signed records and checkpoints and of the contract: no clock,
//! no previous run's output, no hash-map order.
//!
//! Arrival. A ledger record carries no arrival time of its own, but every
//! signed checkpoint says when it was signed (`time`) and commits to a
//! prefix of the records. A record has arrived by an instant if a
//! checkpoint signed by then covers it. The statement of month M is
//! computed against M's cutoff checkpoint: of the checkpoints signed at or
//! before M's end plus the grace, the one covering the most records. A
//! record of month M that this checkpoint does not cover is late: it is
//! settled, as an adjustment line citing M's cutoff checkpoint, in the
//! first later statement whose cutoff checkpoint covers it.

use crate::capacity::{self, Buyback, Measured};
use crate::contract::{Contract, FundedBy};
use crate::credits::{CreditBook, CreditOutcome};
use crate::error::SettleError;
use crate::money::{self, BPS};
use crate::period::{format_instant, Month};
use crate::pricing::{self, PricedLine};
use crate::source::{Fact, FactBody, SignedCheckpoint, VerifiedLedger};
use serde::Serialize;
use std::collections::BTreeMap;

/// The `schema` of statements this version writes.
pub const SCHEMA: &str = "tokenmill/statement/v1";

/// A settlement statement for one month.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Statement {
    /// Always [`SCHEMA`].
    pub schema: &'static str,
    /// The contract and its parties.
    pub contract: ContractRef,
    /// The month, `YYYY-MM`.
    pub period: String,
    /// Its first second (UTC).
    pub period_start: String,
    /// The first second after it.
    pub period_end: String,
    /// `period_end` plus the grace: checkpoints signed by then count.
    pub cutoff: String,
    /// The checkpoint the statement is computed from: the cutoff
    /// checkpoint of the month (none if no checkpoint was signed by the
    /// cutoff).
    pub checkpoint: Option<CheckpointRef>,
    /// Whether the ledger has a checkpoint signed after the cutoff, which
    /// shows the cutoff has passed in the ledger's own time; a statement
    /// that is not final can still gain records.
    #[serde(rename = "final")]
    pub is_final: bool,
    /// Records settled in this statement.
    pub records: RecordCounts,
    /// Gross revenue.
    pub revenue: Revenue,
    /// Credits drawn and what was paid in cash.
    pub credits: Credits,
    /// Revenue share owed to the backer.
    pub revenue_share: Share,
    /// Unsold capacity the backer buys back (absent without a capacity
    /// clause).
    pub capacity: Option<CapacitySection>,
    /// Advances recouped for the backer.
    pub recoupment: Recoupment,
    /// Who pays whom.
    pub net: Net,
}

/// The contract a statement settles.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ContractRef {
    /// Contract id.
    pub id: String,
    /// Currency code; amounts are micro-units of it.
    pub currency: String,
    /// The cloud.
    pub cloud: String,
    /// The backer.
    pub backer: String,
}

/// A signed checkpoint, named by size and root.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct CheckpointRef {
    /// The ledger's origin.
    pub origin: String,
    /// Records it covers.
    pub tree_size: u64,
    /// Merkle root, hex.
    pub root: String,
    /// When it was signed, milliseconds since the Unix epoch.
    pub time_ms: Option<u64>,
    /// The witnesses that cosigned it (settling on witnessed checkpoints).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub cosigned_by: Vec<String>,
}

/// Counts of records settled.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct RecordCounts {
    /// Usage records of this month.
    pub usage: u64,
    /// Usage records of earlier months that arrived late.
    pub usage_late: u64,
    /// Capacity records of this month.
    pub capacity: u64,
    /// Capacity records of earlier months that arrived late.
    pub capacity_late: u64,
}

/// Where a late line's records belong and the checkpoint they were
/// missing from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Late {
    /// The month the records belong to.
    pub month: String,
    /// That month's cutoff checkpoint, which did not cover them.
    pub missing_from: Option<CheckpointRef>,
}

/// One priced line of gross revenue.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RevenueLine {
    /// Tenant.
    pub tenant: String,
    /// Model.
    pub model: String,
    /// `input`, `cached_input` or `output`.
    pub kind: &'static str,
    /// Contract period (1-based) of the records' time.
    pub contract_period: u32,
    /// Tokens.
    pub tokens: u64,
    /// Micro-units per million tokens.
    pub price_per_million: i64,
    /// Micro-units.
    pub amount: i64,
    /// Set for records that arrived after their month's cutoff.
    pub late: Option<Late>,
}

/// Gross revenue: lines and their sums.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Revenue {
    /// The lines.
    pub lines: Vec<RevenueLine>,
    /// Sum of the lines by tenant.
    pub by_tenant: BTreeMap<String, i64>,
    /// Sum of the lines by model.
    pub by_model: BTreeMap<String, i64>,
    /// Sum of the lines by token kind.
    pub by_kind: BTreeMap<&'static str, i64>,
    /// Sum of the lines.
    pub total: i64,
}

/// One credit's movements.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct CreditLine {
    /// Credit id.
    pub credit: String,
    /// Its tenant.
    pub tenant: String,
    /// `backer` or `cloud`.
    pub funded_by: &'static str,
    /// Balance before.
    pub opening: i64,
    /// Drawn in this statement.
    pub drawn: i64,
    /// Lapsed at the end of this statement.
    pub expired: i64,
    /// Balance after.
    pub closing: i64,
}

/// One tenant's bill.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct TenantBill {
    /// Tenant.
    pub tenant: String,
    /// Its gross revenue.
    pub gross: i64,
    /// Paid by backer-funded credits.
    pub backer_credits: i64,
    /// Paid by cloud-funded credits.
    pub cloud_credits: i64,
    /// Paid in cash.
    pub cash: i64,
}

/// Credits drawn and cash paid.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Credits {
    /// Credits live in the month, in the contract's order.
    pub lines: Vec<CreditLine>,
    /// Per tenant with revenue.
    pub by_tenant: Vec<TenantBill>,
    /// Drawn from backer-funded credits (the backer pays these).
    pub backer_funded: i64,
    /// Drawn from cloud-funded credits.
    pub cloud_funded: i64,
    /// Paid in cash by tenants.
    pub cash: i64,
}

/// Revenue share of one contract period's revenue in the statement.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ShareLine {
    /// Contract period (1-based).
    pub contract_period: u32,
    /// Its first second.
    pub from: String,
    /// The first second after it.
    pub to: String,
    /// Its rate.
    pub bps: u32,
    /// Gross revenue of the statement's lines in that period.
    pub revenue: i64,
    /// `revenue * bps / 10,000`, rounded half to even.
    pub amount: i64,
}

/// Revenue share owed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Share {
    /// Per contract period.
    pub lines: Vec<ShareLine>,
    /// Sum of the lines.
    pub total: i64,
}

/// One month's buyback: the statement's own month, or an earlier month
/// whose capacity records arrived late.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct CapacityLine {
    /// The month measured.
    pub month: String,
    /// Set for an adjustment of an earlier month.
    pub late: Option<Late>,
    /// The month's figures with every record settled so far.
    #[serde(flatten)]
    pub figures: Buyback,
    /// Buyback of that month settled by earlier statements.
    pub previously_settled: i64,
    /// Owed now: `buyback - previously_settled`.
    pub amount: i64,
}

/// Capacity buyback owed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct CapacitySection {
    /// The lines.
    pub lines: Vec<CapacityLine>,
    /// Sum of their amounts.
    pub total: i64,
}

/// One recoupment.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RecoupmentLine {
    /// Credit id.
    pub credit: String,
    /// Tenant.
    pub tenant: String,
    /// Recoupment rate.
    pub bps: u32,
    /// The tenant's cash in the statement.
    pub cash: i64,
    /// Unrecouped before.
    pub outstanding_before: i64,
    /// Recouped now.
    pub amount: i64,
    /// Unrecouped after.
    pub outstanding_after: i64,
}

/// Credit recoupment owed to the backer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Recoupment {
    /// The lines.
    pub lines: Vec<RecoupmentLine>,
    /// Sum of their amounts.
    pub total: i64,
}

/// The net settlement between the parties.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Net {
    /// Revenue share plus recoupment.
    pub cloud_owes_backer: i64,
    /// Capacity buyback plus backer-funded credits drawn.
    pub backer_owes_cloud: i64,
    /// `cloud`, `backer`, or `none` when they cancel out.
    pub payer: &'static str,
    /// The other party, or `none`.
    pub payee: &'static str,
    /// What the payer pays: the difference of the two.
    pub amount: i64,
}

/// The calendar months of the term, first to last.
pub fn term_months(contract: &Contract) -> Vec<Month> {
    let mut months = Vec::new();
    let mut m = Month::of(contract.term.start);
    while m.start() < contract.term.end {
        months.push(m);
        m = m.next();
    }
    months
}

/// The index of the cutoff checkpoint for a deadline: of the checkpoints
/// signed at or before it, the first that covers the most records.
fn cutoff_checkpoint(checkpoints: &[SignedCheckpoint], deadline: i64) -> Option<usize> {
    let deadline_ms = i128::from(deadline) * 1000;
    let mut best: Option<usize> = None;
    for (i, c) in checkpoints.iter().enumerate() {
        let Some(t) = c.time_ms else { continue };
        if i128::from(t) > deadline_ms {
            continue;
        }
        if best.is_none_or(|b| c.size > checkpoints[b].size) {
            best = Some(i);
        }
    }
    best
}

fn checkpoint_ref(c: &SignedCheckpoint) -> CheckpointRef {
    CheckpointRef {
        origin: c.origin.clone(),
        tree_size: c.size,
        root: c.root.to_hex(),
        time_ms: c.time_ms,
        cosigned_by: c.cosigned_by.clone(),
    }
}

/// Settles `period` under `contract` from a verified ledger.
pub fn settle(
    contract: &Contract,
    ledger: &VerifiedLedger,
    period: Month,
) -> Result<Statement, SettleError> {
    let months = term_months(contract);
    let target =
        months
            .iter()
            .position(|m| *m == period)
            .ok_or_else(|| SettleError::OutsideTerm {
                period,
                first: months.first().copied(),
                last: months.last().copied(),
            })?;
    let grace = contract.term.grace_seconds;
    let cutoffs: Vec<Option<usize>> = months
        .iter()
        .map(|m| cutoff_checkpoint(&ledger.checkpoints, m.end() + grace))
        .collect();
    let covered: Vec<u64> = cutoffs
        .iter()
        .map(|c| c.map_or(0, |i| ledger.checkpoints[i].size))
        .collect();

    // Each record in the term is settled once: in its own month if that
    // month's cutoff covers it, else in the first later month whose does.
    let mut buckets: Vec<Vec<Placed<'_>>> = vec![Vec::new(); target + 1];
    for fact in &ledger.facts {
        let Some(contract_period) = contract.term.period_of(fact.time) else {
            continue;
        };
        let origin = months.partition_point(|m| m.end() <= fact.time);
        if origin > target {
            continue;
        }
        let first_cover = covered.partition_point(|&c| c <= fact.seq);
        let settled_in = origin.max(first_cover);
        if settled_in <= target {
            buckets[settled_in].push(Placed {
                origin,
                contract_period,
                fact,
            });
        }
    }
    pricing::check_models(contract, buckets.iter().flatten().map(|p| p.fact))?;

    let mut run = Run {
        contract,
        ledger,
        months: &months,
        cutoffs: &cutoffs,
        credits: CreditBook::new(contract),
        measured: vec![Measured::default(); months.len()],
        settled_buyback: vec![0; months.len()],
    };
    let mut statement = None;
    for (n, bucket) in buckets.iter().enumerate() {
        statement = Some(run.month(n, bucket)?);
    }
    statement.ok_or(SettleError::NothingToSettle(period))
}

/// A record placed in a statement.
#[derive(Clone, Copy)]
struct Placed<'a> {
    /// Index of the month it belongs to.
    origin: usize,
    /// Its contract period.
    contract_period: u32,
    fact: &'a Fact,
}

/// The state carried from month to month.
struct Run<'a> {
    contract: &'a Contract,
    ledger: &'a VerifiedLedger,
    months: &'a [Month],
    cutoffs: &'a [Option<usize>],
    credits: CreditBook<'a>,
    measured: Vec<Measured>,
    settled_buyback: Vec<i64>,
}

impl Run<'_> {
    fn late(&self, origin: usize, n: usize) -> Option<Late> {
        (origin != n).then(|| Late {
            month: self.months[origin].to_string(),
            missing_from: self.cutoffs[origin].map(|i| checkpoint_ref(&self.ledger.checkpoints[i])),
        })
    }

    fn month(&mut self, n: usize, placed: &[Placed<'_>]) -> Result<Statement, SettleError> {
        let contract = self.contract;
        let month = self.months[n];
        let deadline = month.end() + contract.term.grace_seconds;
        let mut records = RecordCounts::default();
        for p in placed {
            let late = p.origin != n;
            match (&p.fact.body, late) {
                (FactBody::Usage(_), false) => records.usage += 1,
                (FactBody::Usage(_), true) => records.usage_late += 1,
                (FactBody::Capacity(_), false) => records.capacity += 1,
                (FactBody::Capacity(_), true) => records.capacity_late += 1,
            }
        }

        let counts =
            pricing::count_tokens(placed.iter().map(|p| (p.origin, p.contract_period, p.fact)))?;
        let mut priced = pricing::price(contract, counts)?;
        // On-time lines first, then late ones by month (a stable sort keeps
        // the key order within each).
        priced.sort_by_key(|p| p.key.origin != n);
        let revenue = self.revenue(n, &priced)?;
        let share = self.share(&priced)?;
        let outcome = self.credits.apply(month, &revenue.by_tenant)?;
        let credits = self.credit_section(&outcome)?;
        let recoupment = self.recoupment(&outcome)?;
        let capacity = self.capacity(n, placed)?;

        let cloud_owes_backer = money::add(share.total, recoupment.total, "cloud owes backer")?;
        let backer_owes_cloud = money::add(
            capacity.as_ref().map_or(0, |c| c.total),
            credits.backer_funded,
            "backer owes cloud",
        )?;
        let difference = money::sub(cloud_owes_backer, backer_owes_cloud, "net")?;
        let (payer, payee) = match difference.signum() {
            1 => ("cloud", "backer"),
            -1 => ("backer", "cloud"),
            _ => ("none", "none"),
        };
        let checkpoints = &self.ledger.checkpoints;
        Ok(Statement {
            schema: SCHEMA,
            contract: ContractRef {
                id: contract.id.clone(),
                currency: contract.currency.clone(),
                cloud: contract.cloud.clone(),
                backer: contract.backer.clone(),
            },
            period: month.to_string(),
            period_start: format_instant(month.start()),
            period_end: format_instant(month.end()),
            cutoff: format_instant(deadline),
            checkpoint: self.cutoffs[n].map(|i| checkpoint_ref(&checkpoints[i])),
            is_final: checkpoints.iter().any(|c| {
                c.time_ms
                    .is_some_and(|t| i128::from(t) > i128::from(deadline) * 1000)
            }),
            records,
            revenue,
            credits,
            revenue_share: share,
            capacity,
            recoupment,
            net: Net {
                cloud_owes_backer,
                backer_owes_cloud,
                payer,
                payee,
                amount: difference
                    .checked_abs()
                    .ok_or(SettleError::Overflow("net"))?,
            },
        })
    }

    fn revenue(&self, n: usize, priced: &[PricedLine]) -> Result<Revenue, SettleError> {
        let mut by_tenant: BTreeMap<String, i64> = BTreeMap::new();
        let mut by_model: BTreeMap<String, i64> = BTreeMap::new();
        let mut by_kind: BTreeMap<&'static str, i64> = BTreeMap::new();
        let mut lines = Vec::with_capacity(priced.len());
        for p in priced {
            let k = &p.key;
            for (slot, what) in [
                (
                    by_tenant.entry(k.tenant.clone()).or_insert(0),
                    "revenue by tenant",
                ),
                (
                    by_model.entry(k.model.clone()).or_insert(0),
                    "revenue by model",
                ),
                (
                    by_kind.entry(k.kind.as_str()).or_insert(0),
                    "revenue by kind",
                ),
            ] {
                *slot = money::add(*slot, p.amount, what)?;
            }
            lines.push(RevenueLine {
                tenant: k.tenant.clone(),
                model: k.model.clone(),
                kind: k.kind.as_str(),
                contract_period: k.contract_period,
                tokens: p.tokens,
                price_per_million: p.price_per_million,
                amount: p.amount,
                late: self.late(k.origin, n),
            });
        }
        let total = money::sum(priced.iter().map(|p| p.amount), "gross revenue")?;
        Ok(Revenue {
            lines,
            by_tenant,
            by_model,
            by_kind,
            total,
        })
    }

    fn share(&self, priced: &[PricedLine]) -> Result<Share, SettleError> {
        let mut by_period: BTreeMap<u32, i64> = BTreeMap::new();
        for p in priced {
            let slot = by_period.entry(p.key.contract_period).or_insert(0);
            *slot = money::add(*slot, p.amount, "revenue by contract period")?;
        }
        let term = &self.contract.term;
        let lines = by_period
            .into_iter()
            .map(|(k, revenue)| {
                let bps = self.contract.bps_for_period(k);
                Ok(ShareLine {
                    contract_period: k,
                    from: format_instant(term.period_start(k)),
                    to: format_instant(term.period_start(k + 1)),
                    bps,
                    revenue,
                    amount: money::mul_div(
                        i128::from(revenue),
                        i128::from(bps),
                        BPS,
                        "revenue share",
                    )?,
                })
            })
            .collect::<Result<Vec<_>, SettleError>>()?;
        let total = money::sum(lines.iter().map(|l| l.amount), "revenue share")?;
        Ok(Share { lines, total })
    }

    fn credit_section(&self, outcome: &CreditOutcome) -> Result<Credits, SettleError> {
        let credits = &self.contract.credits;
        let lines = outcome
            .lines
            .iter()
            .map(|l| {
                let c = &credits[l.index];
                CreditLine {
                    credit: c.id.clone(),
                    tenant: c.tenant.clone(),
                    funded_by: c.funded_by.as_str(),
                    opening: l.opening,
                    drawn: l.drawn,
                    expired: l.expired,
                    closing: l.closing,
                }
            })
            .collect();
        let by_tenant: Vec<TenantBill> = outcome
            .bills
            .iter()
            .map(|b| TenantBill {
                tenant: b.tenant.clone(),
                gross: b.gross,
                backer_credits: b.backer_credits,
                cloud_credits: b.cloud_credits,
                cash: b.cash,
            })
            .collect();
        let drawn = |funded: FundedBy| {
            money::sum(
                outcome
                    .lines
                    .iter()
                    .filter(|l| credits[l.index].funded_by == funded)
                    .map(|l| l.drawn),
                "credits drawn",
            )
        };
        Ok(Credits {
            lines,
            backer_funded: drawn(FundedBy::Backer)?,
            cloud_funded: drawn(FundedBy::Cloud)?,
            cash: money::sum(by_tenant.iter().map(|b| b.cash), "cash")?,
            by_tenant,
        })
    }

    fn recoupment(&self, outcome: &CreditOutcome) -> Result<Recoupment, SettleError> {
        let credits = &self.contract.credits;
        let lines: Vec<RecoupmentLine> = outcome
            .recoupments
            .iter()
            .map(|r| {
                let c = &credits[r.index];
                RecoupmentLine {
                    credit: c.id.clone(),
                    tenant: c.tenant.clone(),
                    bps: c.recoupment_bps,
                    cash: r.cash,
                    outstanding_before: r.outstanding_before,
                    amount: r.amount,
                    outstanding_after: r.outstanding_after,
                }
            })
            .collect();
        let total = money::sum(lines.iter().map(|l| l.amount), "recoupment")?;
        Ok(Recoupment { lines, total })
    }

    fn capacity(
        &mut self,
        n: usize,
        placed: &[Placed<'_>],
    ) -> Result<Option<CapacitySection>, SettleError> {
        let Some(cap) = &self.contract.capacity else {
            return Ok(None);
        };
        // Months touched: this one always, earlier ones when late records
        // of theirs arrived.
        let mut touched: BTreeMap<usize, Measured> = BTreeMap::new();
        touched.insert(n, Measured::default());
        for p in placed {
            if let FactBody::Capacity(c) = &p.fact.body {
                touched
                    .entry(p.origin)
                    .or_default()
                    .add(c.wall_us, c.busy_us)?;
            }
        }
        let mut lines = Vec::with_capacity(touched.len());
        // Adjustments of earlier months first, then the month itself.
        for (origin, new) in touched {
            let m = &mut self.measured[origin];
            m.merge(new)?;
            let committed = capacity::committed(cap, &self.contract.term, self.months[origin])?;
            let figures = capacity::buyback(cap, committed, *m)?;
            let previously_settled = self.settled_buyback[origin];
            let amount = money::sub(figures.buyback, previously_settled, "buyback adjustment")?;
            self.settled_buyback[origin] = figures.buyback;
            lines.push(CapacityLine {
                month: self.months[origin].to_string(),
                late: self.late(origin, n),
                figures,
                previously_settled,
                amount,
            });
        }
        let total = money::sum(lines.iter().map(|l| l.amount), "capacity buyback")?;
        Ok(Some(CapacitySection { lines, total }))
    }
}
