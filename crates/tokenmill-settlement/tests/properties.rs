//! Properties of settlement over random contracts and ledgers: every
//! statement's lines sum to its totals, more usage never lowers gross
//! revenue, and the share rate never rises over the term.
//!
//! Ledgers here are built in memory (the facts and checkpoints settlement
//! reads from a verified ledger), so hundreds of cases run in well under a
//! second; the on-disk path is covered by the other tests.

use proptest::prelude::*;
use tokenmill_metering::Hash;
use tokenmill_settlement::source::{
    CapacityFact, Fact, FactBody, SignedCheckpoint, UsageFact, VerifiedLedger,
};
use tokenmill_settlement::statement::Statement;
use tokenmill_settlement::{settle, Contract, Month, SettleError};

/// 2025-01-10, the term's start in these tests.
const START: i64 = 1_736_467_200;
const DAY: i64 = 86_400;
const MONTHS: [&str; 4] = ["2025-01", "2025-02", "2025-03", "2025-04"];
const TENANTS: [&str; 3] = ["acme", "beta", "gamma"];
const MODELS: [&str; 2] = ["small", "large"];

fn contract(
    steps: &[(u32, u32)],
    prices: [i64; 6],
    cap: i64,
    credits: &[(usize, i64, i64, bool, u32)],
) -> String {
    let mut t = String::from(
        "id = \"p\"\ncurrency = \"USD\"\n[parties]\ncloud = \"c\"\nbacker = \"b\"\n\
         [term]\nstart = \"2025-01-10\"\nperiod_months = 1\nperiods = 3\ngrace_hours = 24\n",
    );
    for (from, bps) in steps {
        t += &format!("[[revenue_share]]\nfrom_period = {from}\nbps = {bps}\n");
    }
    for (i, m) in MODELS.iter().enumerate() {
        t += &format!(
            "[prices.{m}]\ninput = {}\ncached_input = {}\noutput = {}\n",
            prices[3 * i],
            prices[3 * i + 1],
            prices[3 * i + 2]
        );
    }
    t += &format!(
        "[capacity]\ngpus = 2\nbuyback_price_per_gpu_hour = 1_500_000\nbuyback_cap_per_month = {cap}\n"
    );
    for (i, (tenant, amount, start_day, backer, bps)) in credits.iter().enumerate() {
        let granted = START + start_day * DAY;
        let fmt = |t: i64| tokenmill_settlement::period::format_instant(t);
        t += &format!(
            "[[credits]]\nid = \"c{i}\"\ntenant = \"{}\"\namount = {amount}\ngranted_at = \"{}\"\n\
             expires_at = \"{}\"\nfunded_by = \"{}\"\nrecoupment_bps = {}\n",
            TENANTS[*tenant],
            fmt(granted),
            fmt(granted + 40 * DAY),
            if *backer { "backer" } else { "cloud" },
            if *backer { *bps } else { 0 },
        );
    }
    t
}

/// A declining schedule: starts at `first` bps and each step lowers it.
fn schedule() -> impl Strategy<Value = Vec<(u32, u32)>> {
    (0u32..=10_000, prop::collection::vec(0u32..=3_000, 0..=2)).prop_map(|(first, cuts)| {
        let mut steps = vec![(1, first)];
        let mut bps = first;
        for (i, cut) in cuts.iter().enumerate() {
            bps = bps.saturating_sub(*cut);
            steps.push((i as u32 + 2, bps));
        }
        steps
    })
}

#[derive(Clone, Debug)]
enum Rec {
    Usage {
        tenant: usize,
        model: usize,
        day: i64,
        input: u64,
        cached: u64,
        output: u64,
    },
    Capacity {
        day: i64,
        wall: f64,
        busy_share: f64,
    },
}

fn rec() -> impl Strategy<Value = Rec> {
    prop_oneof![
        3 => (0..3usize, 0..2usize, 0i64..110, 0u64..5_000_000, 0u64..5_000_000, 0u64..5_000_000)
            .prop_map(|(tenant, model, day, input, cached, output)| Rec::Usage { tenant, model, day, input, cached, output }),
        1 => (0i64..110, 0.0f64..200_000.0, 0.0f64..=1.0)
            .prop_map(|(day, wall, busy_share)| Rec::Capacity { day, wall, busy_share }),
    ]
}

/// Facts in record order; a checkpoint every `every` records, signed on the
/// day after the last record it covers (some arrive after their cutoff).
fn ledger(recs: &[Rec], every: usize) -> VerifiedLedger {
    let mut facts = Vec::new();
    let mut checkpoints = Vec::new();
    let mut last_day = 0;
    for (seq, r) in recs.iter().enumerate() {
        let (time, body) = match r {
            Rec::Usage {
                tenant,
                model,
                day,
                input,
                cached,
                output,
            } => (
                START + day * DAY + 3600,
                FactBody::Usage(UsageFact {
                    tenant: TENANTS[*tenant].into(),
                    model: MODELS[*model].into(),
                    input: *input,
                    cached_input: *cached,
                    output: *output,
                }),
            ),
            Rec::Capacity {
                day,
                wall,
                busy_share,
            } => {
                let wall_us = (wall * 1e6) as i64;
                (
                    START + day * DAY,
                    FactBody::Capacity(CapacityFact {
                        wall_us,
                        busy_us: (wall_us as f64 * busy_share) as i64,
                    }),
                )
            }
        };
        last_day = last_day.max((time - START) / DAY);
        facts.push(Fact {
            seq: seq as u64,
            time,
            body,
        });
        if (seq + 1) % every == 0 || seq + 1 == recs.len() {
            checkpoints.push(SignedCheckpoint {
                origin: "o".into(),
                size: seq as u64 + 1,
                root: Hash::ZERO,
                time_ms: Some(
                    u64::try_from((START + (last_day + 1) * DAY) * 1000).expect("positive"),
                ),
                cosigned_by: Vec::new(),
            });
        }
    }
    VerifiedLedger { checkpoints, facts }
}

fn all_months(c: &Contract, l: &VerifiedLedger) -> Result<Vec<Statement>, SettleError> {
    MONTHS
        .iter()
        .map(|m| settle(c, l, Month::parse(m).expect("month")))
        .collect()
}

fn check_sums(s: &Statement) {
    let r = &s.revenue;
    let lines: i64 = r.lines.iter().map(|l| l.amount).sum();
    assert_eq!(lines, r.total);
    assert_eq!(r.by_tenant.values().sum::<i64>(), r.total);
    assert_eq!(r.by_model.values().sum::<i64>(), r.total);
    assert_eq!(r.by_kind.values().sum::<i64>(), r.total);
    for (tenant, amount) in &r.by_tenant {
        let of_tenant: i64 = r
            .lines
            .iter()
            .filter(|l| &l.tenant == tenant)
            .map(|l| l.amount)
            .sum();
        assert_eq!(of_tenant, *amount);
    }
    let share_revenue: i64 = s.revenue_share.lines.iter().map(|l| l.revenue).sum();
    assert_eq!(share_revenue, r.total);
    assert_eq!(
        s.revenue_share.lines.iter().map(|l| l.amount).sum::<i64>(),
        s.revenue_share.total
    );
    let c = &s.credits;
    for b in &c.by_tenant {
        assert_eq!(b.backer_credits + b.cloud_credits + b.cash, b.gross);
        assert!(b.cash >= 0 && b.backer_credits >= 0 && b.cloud_credits >= 0);
    }
    assert_eq!(c.by_tenant.iter().map(|b| b.gross).sum::<i64>(), r.total);
    assert_eq!(
        c.lines.iter().map(|l| l.drawn).sum::<i64>(),
        c.backer_funded + c.cloud_funded
    );
    assert_eq!(c.backer_funded + c.cloud_funded + c.cash, r.total);
    for l in &c.lines {
        assert_eq!(l.opening - l.drawn - l.expired, l.closing);
        assert!(l.closing >= 0);
    }
    let cap = s.capacity.as_ref().expect("capacity clause");
    assert_eq!(cap.lines.iter().map(|l| l.amount).sum::<i64>(), cap.total);
    for l in &cap.lines {
        let f = &l.figures;
        assert!(f.buyback <= f.cap && f.unsold_micro_gpu_hours <= f.idle_micro_gpu_hours);
        assert_eq!(l.figures.buyback - l.previously_settled, l.amount);
    }
    assert_eq!(
        s.recoupment.lines.iter().map(|l| l.amount).sum::<i64>(),
        s.recoupment.total
    );
    for b in &c.by_tenant {
        let recouped: i64 = s
            .recoupment
            .lines
            .iter()
            .filter(|l| l.tenant == b.tenant)
            .map(|l| l.amount)
            .sum();
        assert!(recouped <= b.cash);
    }
    let n = &s.net;
    assert_eq!(
        n.cloud_owes_backer,
        s.revenue_share.total + s.recoupment.total
    );
    assert_eq!(n.backer_owes_cloud, cap.total + c.backer_funded);
    assert_eq!(n.amount, (n.cloud_owes_backer - n.backer_owes_cloud).abs());
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn lines_sum_to_totals(
        steps in schedule(),
        prices in prop::array::uniform6(0i64..3_000_000),
        cap in 0i64..400_000_000,
        credits in prop::collection::vec((0..3usize, 1i64..5_000_000, 0i64..80, any::<bool>(), 0u32..=10_000), 0..4),
        recs in prop::collection::vec(rec(), 0..40),
        every in 1usize..6,
    ) {
        let c = Contract::parse(&contract(&steps, prices, cap, &credits)).expect("valid contract");
        let statements = all_months(&c, &ledger(&recs, every)).expect("settles");
        for s in &statements {
            check_sums(s);
        }
        // Every usage record is settled exactly once over the term (those
        // covered by some cutoff checkpoint; the last checkpoint is signed
        // the day after the last record, before the last cutoff).
        // The term is the 90 days from 10 January.
        let usage = recs.iter().filter(|r| matches!(r, Rec::Usage { day, .. } if *day < 90)).count() as u64;
        let settled: u64 = statements.iter().map(|s| s.records.usage + s.records.usage_late).sum();
        prop_assert_eq!(settled, usage);
        // Backer credits drawn are recouped at most once.
        let drawn: i64 = statements.iter().map(|s| s.credits.backer_funded).sum();
        let recouped: i64 = statements.iter().map(|s| s.recoupment.total).sum();
        prop_assert!(recouped <= drawn);
    }

    #[test]
    fn more_usage_never_lowers_gross_revenue(
        prices in prop::array::uniform6(0i64..3_000_000),
        recs in prop::collection::vec(rec(), 0..30),
        extra in prop::collection::vec(rec(), 1..10),
    ) {
        let c = Contract::parse(&contract(&[(1, 1000)], prices, 0, &[])).expect("valid contract");
        // The extra records are appended after the others, under one more
        // checkpoint; gross revenue summed over the term, and each tenant's,
        // can only grow.
        let before = all_months(&c, &ledger(&recs, 1)).expect("settles");
        let mut more = recs.clone();
        more.extend(extra);
        let after = all_months(&c, &ledger(&more, 1)).expect("settles");
        let gross = |ss: &[Statement], tenant: Option<&str>| -> i64 {
            ss.iter().map(|s| match tenant {
                None => s.revenue.total,
                Some(t) => s.revenue.by_tenant.get(t).copied().unwrap_or(0),
            }).sum()
        };
        prop_assert!(gross(&after, None) >= gross(&before, None));
        for t in TENANTS {
            prop_assert!(gross(&after, Some(t)) >= gross(&before, Some(t)));
        }
    }

    #[test]
    fn share_rates_never_rise_over_the_term(
        raw in prop::collection::vec(0u32..=10_000, 1..6),
    ) {
        // Any schedule: accepted only if it never rises, and then the rate
        // of each period is never above the one before.
        let steps: Vec<(u32, u32)> = raw.iter().enumerate().map(|(i, b)| (i as u32 + 1, *b)).collect();
        let mut text = contract(&[], [1; 6], 0, &[]).replace("periods = 3", "periods = 6");
        for (from, bps) in &steps {
            text += &format!("[[revenue_share]]\nfrom_period = {from}\nbps = {bps}\n");
        }
        let rising = raw.windows(2).any(|w| w[1] > w[0]);
        match Contract::parse(&text) {
            Ok(c) => {
                prop_assert!(!rising);
                for k in 2..=c.term.periods {
                    prop_assert!(c.bps_for_period(k) <= c.bps_for_period(k - 1));
                }
            }
            Err(e) => {
                prop_assert!(rising, "refused: {}", e);
                prop_assert!(e.to_string().contains("may not rise"), "{}", e);
            }
        }
    }
}
