//! Gross revenue: usage priced by the contract's price list, one line per
//! tenant, model, token kind and contract period (and, for records that
//! arrived late, per month they belong to), each rounded once.
//!
//! Lines are keyed by contract period as well as by tenant, model and kind
//! so that a statement month that crosses a revenue-share boundary keeps
//! the revenue on each side apart: the share of each side is then its own
//! rate times its own lines, split by record time.

use crate::contract::Contract;
use crate::error::SettleError;
use crate::money::{self, MICRO};
use crate::source::{Fact, FactBody};
use serde::Serialize;
use std::collections::BTreeMap;

/// The kinds of tokens a price list prices.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TokenKind {
    /// Prompt tokens computed.
    Input,
    /// Prompt tokens served from the prefix cache.
    CachedInput,
    /// Completion tokens.
    Output,
}

impl TokenKind {
    /// The name used in JSON, CSV and tables.
    pub fn as_str(self) -> &'static str {
        match self {
            TokenKind::Input => "input",
            TokenKind::CachedInput => "cached_input",
            TokenKind::Output => "output",
        }
    }
}

/// What a revenue line aggregates: tokens of one tenant, model and kind in
/// one contract period, from one month (`origin`: the statement's own month
/// for on-time records, an earlier one for late records).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct LineKey {
    /// Index of the month the records belong to, counted from the term's
    /// first month.
    pub origin: usize,
    /// The tenant.
    pub tenant: String,
    /// The model.
    pub model: String,
    /// The contract period (1-based).
    pub contract_period: u32,
    /// The kind of token.
    pub kind: TokenKind,
}

/// A priced line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PricedLine {
    /// What it covers.
    pub key: LineKey,
    /// Tokens.
    pub tokens: u64,
    /// Micro-units per million tokens.
    pub price_per_million: i64,
    /// `tokens * price_per_million / 1,000,000`, rounded half to even.
    pub amount: i64,
}

/// Sums the usage of `facts` (each with its month index and contract
/// period) into token counts per line.
pub fn count_tokens<'a>(
    facts: impl IntoIterator<Item = (usize, u32, &'a Fact)>,
) -> Result<BTreeMap<LineKey, u64>, SettleError> {
    let mut counts: BTreeMap<LineKey, u64> = BTreeMap::new();
    for (origin, contract_period, f) in facts {
        let FactBody::Usage(u) = &f.body else {
            continue;
        };
        for (kind, tokens) in [
            (TokenKind::Input, u.input),
            (TokenKind::CachedInput, u.cached_input),
            (TokenKind::Output, u.output),
        ] {
            if tokens == 0 {
                continue;
            }
            let key = LineKey {
                origin,
                tenant: u.tenant.clone(),
                model: u.model.clone(),
                contract_period,
                kind,
            };
            let slot = counts.entry(key).or_insert(0);
            *slot = slot
                .checked_add(tokens)
                .ok_or(SettleError::Overflow("token count"))?;
        }
    }
    Ok(counts)
}

/// Prices token counts. Models the price list lacks are refused before
/// this point (see [`check_models`]).
pub fn price(
    contract: &Contract,
    counts: BTreeMap<LineKey, u64>,
) -> Result<Vec<PricedLine>, SettleError> {
    counts
        .into_iter()
        .map(|(key, tokens)| {
            let p = contract
                .prices
                .get(&key.model)
                .ok_or_else(|| SettleError::Contract {
                    field: "prices".into(),
                    message: format!("no price for model {:?}", key.model),
                })?;
            let price_per_million = match key.kind {
                TokenKind::Input => p.input,
                TokenKind::CachedInput => p.cached_input,
                TokenKind::Output => p.output,
            };
            let amount = money::mul_div(
                i128::from(tokens),
                i128::from(price_per_million),
                MICRO,
                "revenue line",
            )?;
            Ok(PricedLine {
                key,
                tokens,
                price_per_million,
                amount,
            })
        })
        .collect()
}

/// Refuses the first usage record whose model has no price.
pub fn check_models<'a>(
    contract: &Contract,
    facts: impl IntoIterator<Item = &'a Fact>,
) -> Result<(), SettleError> {
    for f in facts {
        if let FactBody::Usage(u) = &f.body {
            if !contract.prices.contains_key(&u.model) {
                return Err(SettleError::UnpricedModel {
                    seq: f.seq,
                    model: u.model.clone(),
                });
            }
        }
    }
    Ok(())
}
