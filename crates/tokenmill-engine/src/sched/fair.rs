//! Fair admission across tenants: one waiting queue per tenant and a
//! virtual-token counter per tenant.
//!
//! Every token the engine computes for a tenant (prefill chunks and decodes,
//! but not prompt tokens served from the prefix cache) adds `1 / weight` to
//! its counter. The next sequence admitted is the oldest waiting one of the
//! backlogged tenant with the smallest counter, so two tenants that both
//! have work waiting get computed tokens in proportion to their weights,
//! however many requests each sends. A tenant that becomes backlogged again
//! is lifted to the smallest counter among the tenants already waiting (or
//! to the largest counter when none are): time spent idle is not credit to
//! be spent later at the others' expense.

use super::Sequence;
use std::collections::{BTreeMap, VecDeque};
use tokenmill_protocol::TenantId;

/// The waiting sequences of all tenants.
#[derive(Default)]
pub struct FairQueue {
    tenants: BTreeMap<TenantId, TenantQueue>,
    len: usize,
}

#[derive(Default)]
struct TenantQueue {
    waiting: VecDeque<Sequence>,
    /// Tokens computed for the tenant, divided by its weight.
    served: f64,
    weight: u32,
}

impl FairQueue {
    /// Sequences waiting.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing waits.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Sequences of `tenant` waiting.
    pub fn waiting_for(&self, tenant: &TenantId) -> usize {
        self.tenants.get(tenant).map_or(0, |q| q.waiting.len())
    }

    /// Queues a newly arrived sequence behind its tenant's others.
    pub fn push_back(&mut self, sequence: Sequence) {
        let tenant = sequence.share().tenant.clone();
        if self
            .tenants
            .get(&tenant)
            .is_none_or(|q| q.waiting.is_empty())
        {
            let floor = self.lift_floor(&tenant);
            let queue = self.entry(&sequence);
            queue.served = queue.served.max(floor);
        }
        self.entry(&sequence).waiting.push_back(sequence);
        self.len += 1;
    }

    /// Puts a sequence back at the head of its tenant's queue (preempted, or
    /// a completion released once its prompt is cached): it keeps its place.
    pub fn push_front(&mut self, sequence: Sequence) {
        self.entry(&sequence).waiting.push_front(sequence);
        self.len += 1;
    }

    /// The sequence admitted next, if any.
    pub fn front_mut(&mut self) -> Option<&mut Sequence> {
        let tenant = self.next_tenant()?;
        self.tenants.get_mut(&tenant)?.waiting.front_mut()
    }

    /// Removes and returns the sequence [`FairQueue::front_mut`] shows.
    pub fn pop_front(&mut self) -> Option<Sequence> {
        let tenant = self.next_tenant()?;
        let sequence = self.tenants.get_mut(&tenant)?.waiting.pop_front()?;
        self.len -= 1;
        Some(sequence)
    }

    /// Counts `tokens` computed for `tenant`.
    pub fn charge(&mut self, tenant: &TenantId, weight: u32, tokens: usize) {
        let queue = self.tenants.entry(tenant.clone()).or_default();
        queue.weight = weight.max(1);
        queue.served += tokens as f64 / f64::from(queue.weight);
    }

    /// A tenant's counter (tokens computed over weight).
    pub fn served(&self, tenant: &TenantId) -> f64 {
        self.tenants.get(tenant).map_or(0.0, |q| q.served)
    }

    /// Removes every waiting sequence for which `take` holds.
    pub fn extract(&mut self, mut take: impl FnMut(&Sequence) -> bool) -> Vec<Sequence> {
        let mut taken = Vec::new();
        for queue in self.tenants.values_mut() {
            let (out, kept): (Vec<_>, Vec<_>) = queue.waiting.drain(..).partition(&mut take);
            queue.waiting = kept.into();
            taken.extend(out);
        }
        self.len -= taken.len();
        taken
    }

    /// The backlogged tenant with the smallest counter; on a tie, the one
    /// whose head of line arrived first.
    fn next_tenant(&self) -> Option<TenantId> {
        self.tenants
            .iter()
            .filter_map(|(tenant, q)| q.waiting.front().map(|s| (tenant, q.served, s)))
            .min_by(|a, b| {
                a.1.total_cmp(&b.1)
                    .then_with(|| a.2.arrived_at().cmp(&b.2.arrived_at()))
            })
            .map(|(tenant, _, _)| tenant.clone())
    }

    /// The counter a tenant becoming backlogged starts from at least.
    fn lift_floor(&self, tenant: &TenantId) -> f64 {
        let others = self.tenants.iter().filter(|(t, _)| *t != tenant);
        let backlogged = others
            .clone()
            .filter(|(_, q)| !q.waiting.is_empty())
            .map(|(_, q)| q.served)
            .reduce(f64::min);
        backlogged.unwrap_or_else(|| others.map(|(_, q)| q.served).fold(0.0, f64::max))
    }

    fn entry(&mut self, sequence: &Sequence) -> &mut TenantQueue {
        let share = sequence.share();
        let queue = self.tenants.entry(share.tenant.clone()).or_default();
        queue.weight = share.weight.max(1);
        queue
    }
}
