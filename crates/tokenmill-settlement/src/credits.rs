//! Token credit advances: what each statement draws from them, in a stated
//! order, and what the backer recoups from the tenant's later cash.
//!
//! The book carries balances from one statement to the next, so a
//! statement is only correct after every earlier statement of the term has
//! been applied to the same book; [`crate::settle`] does exactly that, from
//! the first month, every time.
//!
//! Rules (docs/contract.md, "Credits"):
//! - a credit may be drawn by a statement whose month it is live in at any
//!   instant (`granted_at < month end` and `expires_at > month start`);
//! - a tenant's gross revenue of the statement is paid from its live
//!   credits first, earliest `expires_at` first (then earliest
//!   `granted_at`, then the contract's order), and the rest in cash;
//! - what remains of a credit after the last statement it is live in
//!   expires;
//! - each backer-funded credit with an unrecouped balance (drawn so far
//!   minus recouped so far) takes `recoupment_bps` of the tenant's cash of
//!   the statement, rounded half to even, at most its unrecouped balance,
//!   and all of a tenant's recoupments together at most its cash; credits
//!   are taken by `granted_at`, then the contract's order.

use crate::contract::{Contract, Credit, FundedBy};
use crate::error::SettleError;
use crate::money::{self, BPS};
use crate::period::{Instant, Month};
use std::collections::BTreeMap;

/// Per credit: what is left, drawn and recouped so far.
#[derive(Clone, Debug, Default)]
struct CreditState {
    balance: i64,
    drawn: i64,
    recouped: i64,
}

/// The credits of a contract and their running balances.
#[derive(Clone, Debug)]
pub struct CreditBook<'c> {
    credits: &'c [Credit],
    state: Vec<CreditState>,
}

/// One credit's movements in one statement.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CreditLine {
    /// Index of the credit in the contract.
    pub index: usize,
    /// Balance before the statement.
    pub opening: i64,
    /// Drawn by this statement's usage.
    pub drawn: i64,
    /// Lapsed unused at the end of the statement.
    pub expired: i64,
    /// Balance after the statement.
    pub closing: i64,
}

/// One tenant's bill in one statement.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TenantBill {
    /// The tenant.
    pub tenant: String,
    /// Gross revenue of its lines.
    pub gross: i64,
    /// Paid by backer-funded credits.
    pub backer_credits: i64,
    /// Paid by cloud-funded credits.
    pub cloud_credits: i64,
    /// Paid in cash: gross minus credits.
    pub cash: i64,
}

/// One recoupment in one statement.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecoupmentLine {
    /// Index of the credit in the contract.
    pub index: usize,
    /// The tenant's cash in the statement.
    pub cash: i64,
    /// Unrecouped balance before.
    pub outstanding_before: i64,
    /// Recouped now.
    pub amount: i64,
    /// Unrecouped balance after.
    pub outstanding_after: i64,
}

/// What a statement did to the credits.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CreditOutcome {
    /// Per live or recouping credit, in the contract's order.
    pub lines: Vec<CreditLine>,
    /// Per tenant with revenue, by tenant name.
    pub bills: Vec<TenantBill>,
    /// Recoupments, by tenant then the recoupment order.
    pub recoupments: Vec<RecoupmentLine>,
}

fn live_in(c: &Credit, start: Instant, end: Instant) -> bool {
    c.granted_at < end && c.expires_at > start
}

impl<'c> CreditBook<'c> {
    /// A book with every credit at its face value.
    pub fn new(contract: &'c Contract) -> CreditBook<'c> {
        CreditBook {
            credits: &contract.credits,
            state: contract
                .credits
                .iter()
                .map(|c| CreditState {
                    balance: c.amount,
                    ..CreditState::default()
                })
                .collect(),
        }
    }

    /// Applies one statement: `gross` is each tenant's gross revenue in it.
    pub fn apply(
        &mut self,
        month: Month,
        gross: &BTreeMap<String, i64>,
    ) -> Result<CreditOutcome, SettleError> {
        let (start, end) = (month.start(), month.end());
        let live: Vec<usize> = (0..self.credits.len())
            .filter(|&i| live_in(&self.credits[i], start, end))
            .collect();
        let openings: Vec<i64> = self.state.iter().map(|s| s.balance).collect();
        let mut drawn_now = vec![0i64; self.credits.len()];

        let mut bills = Vec::with_capacity(gross.len());
        for (tenant, &amount) in gross {
            let mut order: Vec<usize> = live
                .iter()
                .copied()
                .filter(|&i| &self.credits[i].tenant == tenant)
                .collect();
            order.sort_by_key(|&i| (self.credits[i].expires_at, self.credits[i].granted_at, i));
            let mut due = amount;
            let (mut backer, mut cloud) = (0i64, 0i64);
            for i in order {
                let take = due.min(self.state[i].balance).max(0);
                if take == 0 {
                    continue;
                }
                let s = &mut self.state[i];
                s.balance = money::sub(s.balance, take, "credit balance")?;
                s.drawn = money::add(s.drawn, take, "credit drawn")?;
                drawn_now[i] = take;
                due = money::sub(due, take, "tenant bill")?;
                match self.credits[i].funded_by {
                    FundedBy::Backer => backer = money::add(backer, take, "backer credits")?,
                    FundedBy::Cloud => cloud = money::add(cloud, take, "cloud credits")?,
                }
            }
            bills.push(TenantBill {
                tenant: tenant.clone(),
                gross: amount,
                backer_credits: backer,
                cloud_credits: cloud,
                cash: due,
            });
        }

        let mut lines = Vec::new();
        for &i in &live {
            let s = &mut self.state[i];
            let expired = if self.credits[i].expires_at <= end {
                std::mem::take(&mut s.balance)
            } else {
                0
            };
            lines.push(CreditLine {
                index: i,
                opening: openings[i],
                drawn: drawn_now[i],
                expired,
                closing: s.balance,
            });
        }

        let recoupments = self.recoup(&bills)?;
        Ok(CreditOutcome {
            lines,
            bills,
            recoupments,
        })
    }

    fn recoup(&mut self, bills: &[TenantBill]) -> Result<Vec<RecoupmentLine>, SettleError> {
        let mut out = Vec::new();
        for bill in bills.iter().filter(|b| b.cash > 0) {
            let mut order: Vec<usize> = (0..self.credits.len())
                .filter(|&i| {
                    let c = &self.credits[i];
                    c.tenant == bill.tenant
                        && c.funded_by == FundedBy::Backer
                        && c.recoupment_bps > 0
                        && self.state[i].drawn > self.state[i].recouped
                })
                .collect();
            order.sort_by_key(|&i| (self.credits[i].granted_at, i));
            let mut left = bill.cash;
            for i in order {
                let s = &mut self.state[i];
                let outstanding = money::sub(s.drawn, s.recouped, "unrecouped balance")?;
                let due = money::mul_div(
                    i128::from(bill.cash),
                    i128::from(self.credits[i].recoupment_bps),
                    BPS,
                    "recoupment",
                )?;
                let amount = due.min(outstanding).min(left);
                s.recouped = money::add(s.recouped, amount, "recouped")?;
                left = money::sub(left, amount, "cash left")?;
                out.push(RecoupmentLine {
                    index: i,
                    cash: bill.cash,
                    outstanding_before: outstanding,
                    amount,
                    outstanding_after: outstanding - amount,
                });
            }
        }
        Ok(out)
    }
}
