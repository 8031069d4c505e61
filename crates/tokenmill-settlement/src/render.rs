//! Statements as JSON, CSV and a table for the terminal. All three are
//! functions of the statement alone, so the same statement always prints
//! the same bytes.

use crate::money::format_micro;
use crate::statement::{CheckpointRef, Late, Statement};
use std::fmt::Write;

/// The statement as pretty-printed JSON, ending in a newline.
pub fn json(s: &Statement) -> String {
    // Every field is a string, an integer, a bool, a list or a map with
    // string keys, which serde_json always serializes.
    let mut out =
        serde_json::to_string_pretty(s).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"));
    out.push('\n');
    out
}

/// The CSV header.
pub const CSV_HEADER: &str =
    "period,section,item,tenant,model,kind,origin_month,quantity,rate,amount";

struct Row<'a> {
    section: &'a str,
    item: String,
    tenant: &'a str,
    model: &'a str,
    kind: &'a str,
    origin: String,
    quantity: String,
    rate: String,
    amount: String,
}

impl<'a> Row<'a> {
    fn new(section: &'a str, item: impl Into<String>) -> Row<'a> {
        Row {
            section,
            item: item.into(),
            tenant: "",
            model: "",
            kind: "",
            origin: String::new(),
            quantity: String::new(),
            rate: String::new(),
            amount: String::new(),
        }
    }
}

/// A CSV field, quoted when it holds a comma, quote or line break.
fn field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_owned()
    }
}

/// The statement as CSV (RFC 4180, `\n` line ends): one row per line of
/// every section, then totals; amounts and quantities are integers
/// (micro-units, tokens, micro-GPU-hours). docs/contract.md lists the rows.
pub fn csv(s: &Statement) -> String {
    let mut rows: Vec<Row<'_>> = Vec::new();
    let mut cp = Row::new(
        "checkpoint",
        s.checkpoint
            .as_ref()
            .map_or(String::new(), |c| c.root.clone()),
    );
    cp.quantity = s
        .checkpoint
        .as_ref()
        .map_or(String::new(), |c| c.tree_size.to_string());
    cp.rate = if s.is_final { "final" } else { "provisional" }.into();
    rows.push(cp);
    for l in &s.revenue.lines {
        let mut r = Row::new("revenue", format!("P{}", l.contract_period));
        r.tenant = &l.tenant;
        r.model = &l.model;
        r.kind = l.kind;
        r.origin = l
            .late
            .as_ref()
            .map_or(s.period.clone(), |x| x.month.clone());
        r.quantity = l.tokens.to_string();
        r.rate = l.price_per_million.to_string();
        r.amount = l.amount.to_string();
        rows.push(r);
    }
    let mut total = Row::new("revenue_total", "");
    total.amount = s.revenue.total.to_string();
    rows.push(total);
    for l in &s.credits.lines {
        let mut r = Row::new("credit_drawn", l.credit.clone());
        r.tenant = &l.tenant;
        r.kind = l.funded_by;
        r.quantity = l.opening.to_string();
        r.amount = l.drawn.to_string();
        rows.push(r);
        if l.expired != 0 {
            let mut r = Row::new("credit_expired", l.credit.clone());
            r.tenant = &l.tenant;
            r.kind = l.funded_by;
            r.amount = l.expired.to_string();
            rows.push(r);
        }
    }
    for b in &s.credits.by_tenant {
        let mut r = Row::new("cash", "");
        r.tenant = &b.tenant;
        r.quantity = b.gross.to_string();
        r.amount = b.cash.to_string();
        rows.push(r);
    }
    for l in &s.revenue_share.lines {
        let mut r = Row::new("revenue_share", format!("P{}", l.contract_period));
        r.quantity = l.revenue.to_string();
        r.rate = l.bps.to_string();
        r.amount = l.amount.to_string();
        rows.push(r);
    }
    let mut total = Row::new("revenue_share_total", "");
    total.amount = s.revenue_share.total.to_string();
    rows.push(total);
    if let Some(c) = &s.capacity {
        for l in &c.lines {
            let mut r = Row::new(
                "buyback",
                if l.late.is_some() {
                    "adjustment"
                } else {
                    "month"
                },
            );
            r.origin = l.month.clone();
            r.quantity = l.figures.unsold_micro_gpu_hours.to_string();
            r.rate = l.figures.price_per_gpu_hour.to_string();
            r.amount = l.amount.to_string();
            rows.push(r);
        }
        let mut total = Row::new("buyback_total", "");
        total.amount = c.total.to_string();
        rows.push(total);
    }
    for l in &s.recoupment.lines {
        let mut r = Row::new("recoupment", l.credit.clone());
        r.tenant = &l.tenant;
        r.quantity = l.cash.to_string();
        r.rate = l.bps.to_string();
        r.amount = l.amount.to_string();
        rows.push(r);
    }
    let mut total = Row::new("recoupment_total", "");
    total.amount = s.recoupment.total.to_string();
    rows.push(total);
    for (item, amount) in [
        ("cloud_owes_backer", s.net.cloud_owes_backer),
        ("backer_owes_cloud", s.net.backer_owes_cloud),
    ] {
        let mut r = Row::new("net", item);
        r.amount = amount.to_string();
        rows.push(r);
    }
    let mut r = Row::new("net", format!("{}_pays_{}", s.net.payer, s.net.payee));
    r.amount = s.net.amount.to_string();
    rows.push(r);

    let mut out = String::from(CSV_HEADER);
    out.push('\n');
    for r in rows {
        let fields = [
            s.period.as_str(),
            r.section,
            &r.item,
            r.tenant,
            r.model,
            r.kind,
            &r.origin,
            &r.quantity,
            &r.rate,
            &r.amount,
        ];
        let line: Vec<String> = fields.iter().map(|f| field(f)).collect();
        out.push_str(&line.join(","));
        out.push('\n');
    }
    out
}

/// Left-aligned text columns; numbers right-aligned.
fn table(out: &mut String, header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |out: &mut String, cells: &[String]| {
        let mut text = String::from("  ");
        for (i, (cell, w)) in cells.iter().zip(&widths).enumerate() {
            let numeric = cell
                .chars()
                .next()
                .is_some_and(|c| c.is_ascii_digit() || c == '-')
                && cell
                    .chars()
                    .all(|c| c.is_ascii_digit() || c == '.' || c == '-');
            let pad = w - cell.chars().count();
            if i > 0 {
                text.push_str("  ");
            }
            if numeric {
                text.push_str(&" ".repeat(pad));
                text.push_str(cell);
            } else {
                text.push_str(cell);
                text.push_str(&" ".repeat(pad));
            }
        }
        out.push_str(text.trim_end());
        out.push('\n');
    };
    let head: Vec<String> = header.iter().map(|h| (*h).to_owned()).collect();
    line(out, &head);
    for row in rows {
        line(out, row);
    }
}

fn cp_text(c: &Option<CheckpointRef>) -> String {
    match c {
        Some(c) if c.cosigned_by.is_empty() => {
            format!("{} records, root {}", c.tree_size, c.root)
        }
        Some(c) => format!(
            "{} records, root {}, cosigned by {}",
            c.tree_size,
            c.root,
            c.cosigned_by.join(", ")
        ),
        None => "none".into(),
    }
}

fn late_text(l: &Option<Late>) -> String {
    match l {
        Some(l) => format!(
            "late from {} (missing from {})",
            l.month,
            cp_text(&l.missing_from)
        ),
        None => String::new(),
    }
}

/// The statement as a readable table, amounts in currency units with six
/// decimals.
pub fn text(s: &Statement) -> String {
    let mut out = String::new();
    let cur = &s.contract.currency;
    let _ = writeln!(
        out,
        "Statement {} of contract {} ({})",
        s.period, s.contract.id, cur
    );
    let _ = writeln!(out, "  cloud:  {}", s.contract.cloud);
    let _ = writeln!(out, "  backer: {}", s.contract.backer);
    let _ = writeln!(
        out,
        "  period {} to {}, cutoff {} ({})",
        s.period_start,
        s.period_end,
        s.cutoff,
        if s.is_final {
            "final"
        } else {
            "provisional: the ledger has no checkpoint after the cutoff yet"
        }
    );
    let _ = writeln!(
        out,
        "  computed from checkpoint: {}",
        cp_text(&s.checkpoint)
    );
    let r = &s.records;
    let _ = writeln!(
        out,
        "  records: {} usage (+{} late), {} capacity (+{} late)",
        r.usage, r.usage_late, r.capacity, r.capacity_late
    );

    let _ = writeln!(out, "\nGross revenue");
    let rows: Vec<Vec<String>> = s
        .revenue
        .lines
        .iter()
        .map(|l| {
            vec![
                l.tenant.clone(),
                l.model.clone(),
                l.kind.to_owned(),
                format!("P{}", l.contract_period),
                l.tokens.to_string(),
                format_micro(l.price_per_million),
                format_micro(l.amount),
                late_text(&l.late),
            ]
        })
        .collect();
    table(
        &mut out,
        &[
            "tenant", "model", "kind", "period", "tokens", "per 1M", "amount", "",
        ],
        &rows,
    );
    let _ = writeln!(out, "  total {}", format_micro(s.revenue.total));

    let _ = writeln!(out, "\nCredits and cash");
    let rows: Vec<Vec<String>> = s
        .credits
        .lines
        .iter()
        .map(|l| {
            vec![
                l.credit.clone(),
                l.tenant.clone(),
                l.funded_by.to_owned(),
                format_micro(l.opening),
                format_micro(l.drawn),
                format_micro(l.expired),
                format_micro(l.closing),
            ]
        })
        .collect();
    table(
        &mut out,
        &[
            "credit",
            "tenant",
            "funded by",
            "opening",
            "drawn",
            "expired",
            "closing",
        ],
        &rows,
    );
    let rows: Vec<Vec<String>> = s
        .credits
        .by_tenant
        .iter()
        .map(|b| {
            vec![
                b.tenant.clone(),
                format_micro(b.gross),
                format_micro(b.backer_credits),
                format_micro(b.cloud_credits),
                format_micro(b.cash),
            ]
        })
        .collect();
    table(
        &mut out,
        &["tenant", "gross", "backer credits", "cloud credits", "cash"],
        &rows,
    );

    let _ = writeln!(out, "\nRevenue share");
    let rows: Vec<Vec<String>> = s
        .revenue_share
        .lines
        .iter()
        .map(|l| {
            vec![
                format!("P{}", l.contract_period),
                format!("{} to {}", l.from, l.to),
                format_micro(l.revenue),
                l.bps.to_string(),
                format_micro(l.amount),
            ]
        })
        .collect();
    table(
        &mut out,
        &["period", "span", "revenue", "bps", "share"],
        &rows,
    );
    let _ = writeln!(out, "  total {}", format_micro(s.revenue_share.total));

    if let Some(c) = &s.capacity {
        let _ = writeln!(out, "\nCapacity buyback (GPU-hours)");
        let rows: Vec<Vec<String>> = c
            .lines
            .iter()
            .map(|l| {
                let f = &l.figures;
                vec![
                    l.month.clone(),
                    format_micro(f.wall_micro_gpu_hours),
                    format_micro(f.sold_micro_gpu_hours),
                    format_micro(f.committed_micro_gpu_hours),
                    format_micro(f.unsold_micro_gpu_hours),
                    format_micro(f.uncapped),
                    format_micro(f.cap),
                    format_micro(l.previously_settled),
                    format_micro(l.amount),
                    late_text(&l.late),
                ]
            })
            .collect();
        table(
            &mut out,
            &[
                "month",
                "wall",
                "sold",
                "committed",
                "unsold",
                "uncapped",
                "cap",
                "settled before",
                "owed",
                "",
            ],
            &rows,
        );
        let _ = writeln!(out, "  total {}", format_micro(c.total));
    }

    let _ = writeln!(out, "\nRecoupment");
    let rows: Vec<Vec<String>> = s
        .recoupment
        .lines
        .iter()
        .map(|l| {
            vec![
                l.credit.clone(),
                l.tenant.clone(),
                format_micro(l.cash),
                l.bps.to_string(),
                format_micro(l.outstanding_before),
                format_micro(l.amount),
                format_micro(l.outstanding_after),
            ]
        })
        .collect();
    table(
        &mut out,
        &[
            "credit", "tenant", "cash", "bps", "before", "recouped", "after",
        ],
        &rows,
    );
    let _ = writeln!(out, "  total {}", format_micro(s.recoupment.total));

    let n = &s.net;
    let _ = writeln!(out, "\nNet");
    let _ = writeln!(
        out,
        "  cloud owes backer  {} (share + recoupment)",
        format_micro(n.cloud_owes_backer)
    );
    let _ = writeln!(
        out,
        "  backer owes cloud  {} (buyback + backer credits)",
        format_micro(n.backer_owes_cloud)
    );
    if n.payer == "none" {
        let _ = writeln!(out, "  nothing to pay");
    } else {
        let _ = writeln!(
            out,
            "  {} pays {} {} {}",
            n.payer,
            n.payee,
            format_micro(n.amount),
            cur
        );
    }
    out
}
