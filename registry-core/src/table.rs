//! The registry's table of workers, with the indexes that keep its costs flat as it grows.
//!
//! Every worker is in one *bucket*: the workers of one runtime in one state, ordered by the
//! page order `(created_at, id)`. That one index answers everything the registry asks often:
//!
//! - a page of `list_workers` seeks each bucket the filter can match to the page token and
//!   merges them (`O(B · log N + page · B)` for the `B` buckets chosen: at most 7 per
//!   runtime, 1 when runtime and state are both given), then applies the rest of the
//!   filter ([`WorkerFilter::matches`]) to what comes out: a filter the buckets do not
//!   index (labels, and whatever is added later) costs what it skips, never a sort;
//! - a runtime's worker counts by state are the buckets' lengths, so `GET /v1/runtimes`,
//!   every `runtime.updated` and every spawn's runtime check cost nothing per worker;
//! - a snapshot walks the buckets in page order, no sort.
//!
//! A view is stored once, behind an `Arc`, shared by the table and its bucket; readers clone
//! the `Arc` under the registry's lock and do the rest (copying, serializing) outside it.

use std::collections::{BTreeMap, HashMap};
use std::ops::Bound;
use std::sync::Arc;

use crate::{RuntimeId, WorkerFilter, WorkerId, WorkerState, WorkerView};

/// Where a worker stands in the page order.
pub(crate) type PageKey = (i128, WorkerId);

/// The page key of a view.
pub(crate) fn page_key(v: &WorkerView) -> PageKey {
    (v.created_at.unix_timestamp_nanos(), v.id.clone())
}

/// One worker of the table.
pub(crate) struct Record {
    pub(crate) view: Arc<WorkerView>,
    /// The furthest state the worker reached (`unknown` aside): it never goes back behind it.
    pub(crate) furthest: WorkerState,
}

type Bucket = BTreeMap<PageKey, Arc<WorkerView>>;

/// The buckets of one runtime, one per state (in [`WorkerState::ALL`] order).
#[derive(Default)]
struct RuntimeBuckets {
    by_state: [Bucket; 7],
}

fn state_index(state: WorkerState) -> usize {
    WorkerState::ALL
        .iter()
        .position(|s| *s == state)
        .unwrap_or_default()
}

/// Every worker of the registry, by id and in page order.
#[derive(Default)]
pub(crate) struct Table {
    records: HashMap<WorkerId, Record>,
    runtimes: BTreeMap<RuntimeId, RuntimeBuckets>,
}

impl Table {
    pub(crate) fn get(&self, id: &WorkerId) -> Option<&Record> {
        self.records.get(id)
    }

    pub(crate) fn contains(&self, id: &WorkerId) -> bool {
        self.records.contains_key(id)
    }

    pub(crate) fn len(&self) -> usize {
        self.records.len()
    }

    /// Every record, in no particular order (for a count over the whole table).
    pub(crate) fn records(&self) -> impl Iterator<Item = &Record> {
        self.records.values()
    }

    /// Puts `record` in place of the worker's old one, if any, and into its bucket.
    pub(crate) fn insert(&mut self, record: Record) {
        let view = record.view.clone();
        if let Some(old) = self.records.insert(view.id.clone(), record) {
            self.unindex(&old.view);
        }
        self.runtimes
            .entry(view.runtime_id.clone())
            .or_default()
            .by_state[state_index(view.state)]
        .insert(page_key(&view), view);
    }

    /// Takes a worker out; its record, if it was there.
    pub(crate) fn remove(&mut self, id: &WorkerId) -> Option<Record> {
        let old = self.records.remove(id)?;
        self.unindex(&old.view);
        Some(old)
    }

    fn unindex(&mut self, view: &WorkerView) {
        if let Some(rt) = self.runtimes.get_mut(&view.runtime_id) {
            rt.by_state[state_index(view.state)].remove(&page_key(view));
            if rt.by_state.iter().all(BTreeMap::is_empty) {
                self.runtimes.remove(&view.runtime_id);
            }
        }
    }

    /// How many workers of `runtime` are in each state; every state is present.
    pub(crate) fn counts(&self, runtime: &RuntimeId) -> BTreeMap<WorkerState, u64> {
        let rt = self.runtimes.get(runtime);
        WorkerState::ALL
            .into_iter()
            .map(|s| {
                let n = rt.map_or(0, |rt| rt.by_state[state_index(s)].len());
                (s, n as u64)
            })
            .collect()
    }

    /// The ids of `runtime`'s workers.
    pub(crate) fn ids_of(&self, runtime: &RuntimeId) -> Vec<WorkerId> {
        self.runtimes.get(runtime).map_or_else(Vec::new, |rt| {
            rt.by_state
                .iter()
                .flat_map(|b| b.keys().map(|(_, id)| id.clone()))
                .collect()
        })
    }

    /// The buckets that can hold a worker that passes `filter`.
    fn buckets<'a>(&'a self, filter: &WorkerFilter) -> Vec<&'a Bucket> {
        let runtimes: Vec<&RuntimeBuckets> = match &filter.runtime {
            Some(r) => self.runtimes.get(r).into_iter().collect(),
            None => self.runtimes.values().collect(),
        };
        let states = indexed_states(filter);
        runtimes
            .into_iter()
            .flat_map(|rt| {
                rt.by_state
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| states[*i])
                    .map(|(_, b)| b)
            })
            .filter(|b| !b.is_empty())
            .collect()
    }

    /// A page: the first `limit` workers that pass `filter` after `after` (exclusive), in
    /// page order, and the key to continue after when there are more.
    pub(crate) fn page(
        &self,
        filter: &WorkerFilter,
        after: Option<&PageKey>,
        limit: usize,
    ) -> (Vec<Arc<WorkerView>>, Option<PageKey>) {
        let mut workers: Vec<Arc<WorkerView>> =
            self.walk(filter, after).take(limit + 1).cloned().collect();
        if workers.len() > limit {
            workers.truncate(limit);
            let next = workers.last().map(|v| page_key(v));
            (workers, next)
        } else {
            (workers, None)
        }
    }

    /// The workers that pass `filter`, in page order, after `after` (exclusive). Lazy: a
    /// caller that takes a page walks only that far.
    pub(crate) fn walk<'a>(
        &'a self,
        filter: &'a WorkerFilter,
        after: Option<&PageKey>,
    ) -> impl Iterator<Item = &'a Arc<WorkerView>> + 'a {
        let from = match after {
            Some(key) => Bound::Excluded(key.clone()),
            None => Bound::Unbounded,
        };
        let heads = self
            .buckets(filter)
            .into_iter()
            .map(|b| b.range((from.clone(), Bound::Unbounded)).peekable())
            .collect();
        Merge { heads }.filter(move |v| filter.matches(v))
    }
}

/// Which states' buckets a filter can match: all of them unless it names some states.
fn indexed_states(filter: &WorkerFilter) -> [bool; 7] {
    if filter.states.is_empty() {
        return [true; 7];
    }
    let mut only = [false; 7];
    for s in &filter.states {
        only[state_index(*s)] = true;
    }
    only
}

/// Merges sorted bucket ranges into one sorted sequence. The buckets are few (seven per
/// runtime at most), so the smallest head is found by a scan.
struct Merge<'a> {
    heads:
        Vec<std::iter::Peekable<std::collections::btree_map::Range<'a, PageKey, Arc<WorkerView>>>>,
}

impl<'a> Iterator for Merge<'a> {
    type Item = &'a Arc<WorkerView>;

    fn next(&mut self) -> Option<Self::Item> {
        let mut best: Option<(usize, &PageKey)> = None;
        for (i, head) in self.heads.iter_mut().enumerate() {
            if let Some(&(key, _)) = head.peek() {
                if best.is_none_or(|(_, b)| key < b) {
                    best = Some((i, key));
                }
            }
        }
        let (i, _) = best?;
        self.heads[i].next().map(|(_, v)| v)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use proptest::prelude::*;
    use time::OffsetDateTime;

    use super::*;
    use crate::{SourceKey, SourceWorker};

    const RUNTIMES: [&str; 3] = ["a", "b", "c"];

    fn id(n: u8) -> WorkerId {
        format!("w_{n:026}").parse().unwrap()
    }

    fn view(n: u8, runtime: usize, state: usize, created: i64, team: u8) -> WorkerView {
        let worker = SourceWorker {
            key: SourceKey::new(n.to_string()),
            name: None,
            labels: [("team".to_string(), team.to_string())].into(),
            state: WorkerState::ALL[state],
            exit_code: None,
            reason: None,
            // Few distinct times, so that ties are broken by the id.
            created_at: OffsetDateTime::UNIX_EPOCH + time::Duration::seconds(created),
            started_at: None,
            ended_at: None,
            last_seen_at: None,
            profile: None,
            args: Vec::new(),
            command: None,
            restarts: 0,
            last_exit: None,
            retry_at: None,
            health: None,
            message: None,
        };
        WorkerView::from_source(id(n), RuntimeId::new(RUNTIMES[runtime]).unwrap(), &worker)
    }

    #[derive(Clone, Debug)]
    enum Op {
        Upsert(u8, usize, usize, i64, u8),
        Remove(u8),
        /// The next page of the paging under way, or the first of a new one with this
        /// filter (runtime, state, team label) and page size.
        NextPage(Option<usize>, Option<usize>, Option<u8>, usize),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0u8..40, 0usize..3, 0usize..7, 0i64..6, 0u8..2)
                .prop_map(|(n, r, s, c, t)| Op::Upsert(n, r, s, c, t)),
            1 => (0u8..40).prop_map(Op::Remove),
            3 => (
                proptest::option::of(0usize..3),
                proptest::option::of(0usize..7),
                proptest::option::of(0u8..2),
                1usize..9,
            )
                .prop_map(|(r, s, t, l)| Op::NextPage(r, s, t, l)),
        ]
    }

    /// What a page must hold: the whole table sorted, filtered, after the key.
    fn expected(
        model: &BTreeMap<WorkerId, WorkerView>,
        filter: &WorkerFilter,
        after: Option<&PageKey>,
        limit: usize,
    ) -> Vec<WorkerView> {
        let mut all: Vec<&WorkerView> = model.values().filter(|v| filter.matches(v)).collect();
        all.sort_by_key(|v| page_key(v));
        all.into_iter()
            .filter(|v| after.is_none_or(|a| page_key(v) > *a))
            .take(limit)
            .cloned()
            .collect()
    }

    proptest! {
        #[test]
        fn paging_the_index_matches_sorting_the_whole_table(ops in proptest::collection::vec(op(), 1..120)) {
            let mut table = Table::default();
            let mut model: BTreeMap<WorkerId, WorkerView> = BTreeMap::new();
            let mut paging: Option<(WorkerFilter, usize, PageKey)> = None;
            for op in ops {
                match op {
                    Op::Upsert(n, r, s, c, t) => {
                        let v = view(n, r, s, c, t);
                        model.insert(v.id.clone(), v.clone());
                        table.insert(Record { furthest: v.state, view: Arc::new(v) });
                    }
                    Op::Remove(n) => {
                        let was = model.remove(&id(n)).is_some();
                        prop_assert_eq!(table.remove(&id(n)).is_some(), was);
                    }
                    Op::NextPage(r, s, t, limit) => {
                        let (filter, limit, after) = match paging.take() {
                            Some((f, l, key)) => (f, l, Some(key)),
                            None => {
                                let filter = WorkerFilter {
                                    runtime: r.map(|r| RuntimeId::new(RUNTIMES[r]).unwrap()),
                                    states: s.map(|s| WorkerState::ALL[s]).into_iter().collect(),
                                    labels: t.map(|t| ("team".to_string(), t.to_string())).into_iter().collect(),
                                    ..WorkerFilter::default()
                                };
                                (filter, limit, None)
                            }
                        };
                        let (page, next) = table.page(&filter, after.as_ref(), limit);
                        let page: Vec<WorkerView> = page.iter().map(|v| (**v).clone()).collect();
                        let want = expected(&model, &filter, after.as_ref(), limit);
                        prop_assert_eq!(&page, &want);
                        // More pages exactly when more workers match after this one.
                        let rest = page.last().map(page_key).or(after);
                        let more = !expected(&model, &filter, rest.as_ref(), 1).is_empty();
                        prop_assert_eq!(next.is_some(), more && page.len() == limit);
                        if let Some(key) = next {
                            paging = Some((filter, limit, key));
                        }
                    }
                }
                prop_assert_eq!(table.len(), model.len());
                for r in RUNTIMES {
                    let r = RuntimeId::new(r).unwrap();
                    let counts = table.counts(&r);
                    for s in WorkerState::ALL {
                        let n = model.values().filter(|v| v.runtime_id == r && v.state == s).count();
                        prop_assert_eq!(counts[&s], n as u64);
                    }
                    let mut ids = table.ids_of(&r);
                    ids.sort();
                    let want: Vec<WorkerId> = model.values().filter(|v| v.runtime_id == r).map(|v| v.id.clone()).collect();
                    prop_assert_eq!(ids, want);
                }
            }
        }
    }
}
