//! Fair queuing between tenants, as the Kubernetes API server's Priority and Fairness does for its
//! own: work waits in one queue per flow (a namespace), and the queues are served round-robin, so a
//! namespace with ten thousand waiting reconciles delays another namespace's next one by at most one
//! turn, whatever the order they arrived in. Fair by construction, not by timing.
//!
//! [`FairQueue`] is the sans-IO order; [`FairAdmission`] hands out a fixed number of permits in that
//! order (the reconciles that may run at once), parking the work that waits by key.

use crate::lock;
use prometheus_client::metrics::gauge::Gauge;
use std::collections::{HashMap, HashSet, VecDeque};
use std::hash::Hash;
use std::sync::atomic::AtomicI64;
use std::sync::{Arc, Mutex};

/// Items waiting per flow, served one per flow in turn (round-robin over the flows that have any).
#[derive(Debug)]
pub struct FairQueue<K, T> {
    flows: HashMap<K, VecDeque<T>>,
    /// The flows with waiting items, in the order they are served next.
    turns: VecDeque<K>,
}

impl<K, T> Default for FairQueue<K, T> {
    fn default() -> Self {
        Self {
            flows: HashMap::new(),
            turns: VecDeque::new(),
        }
    }
}

impl<K: Clone + Eq + Hash, T> FairQueue<K, T> {
    /// Adds `item` at the back of `flow`'s queue; a flow that had nothing waiting joins the turns
    /// at the back (it is served after every flow already waiting has had one turn).
    pub fn push(&mut self, flow: K, item: T) {
        let queue = self.flows.entry(flow.clone()).or_default();
        if queue.is_empty() {
            self.turns.push_back(flow);
        }
        queue.push_back(item);
    }

    /// The next item: the oldest of the flow whose turn it is; that flow goes to the back of the
    /// turns if it has more. Flows that have nothing left are forgotten (no memory per idle tenant).
    pub fn pop(&mut self) -> Option<(K, T)> {
        let flow = self.turns.pop_front()?;
        let queue = self.flows.get_mut(&flow)?;
        let item = queue.pop_front()?;
        if queue.is_empty() {
            self.flows.remove(&flow);
        } else {
            self.turns.push_back(flow.clone());
        }
        Some((flow, item))
    }

    /// Items waiting in all flows.
    pub fn len(&self) -> usize {
        self.flows.values().map(VecDeque::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.turns.is_empty()
    }

    /// Flows with items waiting.
    pub fn flows(&self) -> usize {
        self.turns.len()
    }
}

/// Admits at most a fixed number of units of work at once, fairly between flows, without holding
/// the work that waits. Work that finds no free permit is parked (its key only, once, in its
/// flow's queue) and the caller goes on; when a permit comes back it is reserved for the next
/// parked work in turn and `wake` hands that work's key back to the caller, whose next `admit`
/// of it claims the permit. So the caller's own queue (kube-runtime's, whose slots never shrink)
/// holds the running work only, and a backlog costs a key per identity, given back once drained.
#[derive(Clone)]
pub struct FairAdmission<F, W> {
    state: Arc<Mutex<AdmissionState<F, W>>>,
    wake: Arc<dyn Fn(W) + Send + Sync>,
    /// Work parked or woken and not admitted yet (a metric).
    waiting: Gauge<i64, AtomicI64>,
}

struct AdmissionState<F, W> {
    free: usize,
    parked: FairQueue<F, W>,
    /// The parked work, so that work asked for again while parked is parked once.
    parked_keys: HashSet<W>,
    /// Work woken with a permit reserved for it, not claimed yet.
    reserved: HashSet<W>,
}

/// One admitted unit of work; the permit goes back (to the next parked work in turn) on drop.
pub struct AdmissionPermit<F: Clone + Eq + Hash, W: Clone + Eq + Hash> {
    admission: FairAdmission<F, W>,
}

impl<F, W> FairAdmission<F, W>
where
    F: Clone + Eq + Hash,
    W: Clone + Eq + Hash,
{
    /// `permits` units of work at once (at least one); `wake` is called, outside any lock, with
    /// each parked work whose turn has come.
    pub fn new(permits: usize, wake: impl Fn(W) + Send + Sync + 'static) -> Self {
        Self {
            state: Arc::new(Mutex::new(AdmissionState {
                free: permits.max(1),
                parked: FairQueue::default(),
                parked_keys: HashSet::new(),
                reserved: HashSet::new(),
            })),
            wake: Arc::new(wake),
            waiting: Gauge::default(),
        }
    }

    /// Counts the work parked or woken and not admitted yet in `gauge` too.
    pub fn counted_in(mut self, gauge: Gauge<i64, AtomicI64>) -> Self {
        self.waiting = gauge;
        self
    }

    /// A permit for `work` if one is reserved for it or free; `None` parks it in `flow`'s queue
    /// (once: asking again while parked keeps its place) until `wake` hands it back.
    pub fn admit(&self, flow: F, work: W) -> Option<AdmissionPermit<F, W>> {
        let mut state = lock(&self.state);
        if state.reserved.remove(&work) {
            shrink_when_empty(&mut state.reserved);
            self.waiting.dec();
        } else if state.parked_keys.contains(&work) {
            return None;
        } else if state.free > 0 {
            state.free -= 1;
        } else {
            state.parked_keys.insert(work.clone());
            state.parked.push(flow, work);
            self.waiting.inc();
            return None;
        }
        Some(AdmissionPermit {
            admission: self.clone(),
        })
    }

    /// `work` was woken but will never be admitted (it is gone): its reserved permit goes on.
    pub fn abandon(&self, work: &W) {
        let mut state = lock(&self.state);
        if state.reserved.remove(work) {
            shrink_when_empty(&mut state.reserved);
            self.waiting.dec();
            self.hand_on(state);
        }
    }

    /// Parked work, the flows it is in, and work woken but not admitted yet.
    pub fn waiting(&self) -> (usize, usize, usize) {
        let state = lock(&self.state);
        (
            state.parked.len(),
            state.parked.flows(),
            state.reserved.len(),
        )
    }

    /// A permit came back: reserved for the next parked work in turn (woken once the lock is
    /// released), or free.
    fn hand_on(&self, mut state: std::sync::MutexGuard<'_, AdmissionState<F, W>>) {
        let Some((_, next)) = state.parked.pop() else {
            state.free += 1;
            return;
        };
        state.parked_keys.remove(&next);
        shrink_when_empty(&mut state.parked_keys);
        state.reserved.insert(next.clone());
        drop(state);
        (self.wake)(next);
    }
}

impl<F: Clone + Eq + Hash, W: Clone + Eq + Hash> Drop for AdmissionPermit<F, W> {
    fn drop(&mut self) {
        let state = lock(&self.admission.state);
        self.admission.hand_on(state);
    }
}

/// Gives a drained set's memory back: after a cold start it may have held every identity.
fn shrink_when_empty<W: Eq + Hash>(set: &mut HashSet<W>) {
    if set.is_empty() {
        set.shrink_to_fit();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flows_are_served_in_turn_whatever_the_arrival_order() {
        let mut queue = FairQueue::default();
        for n in 0..5 {
            queue.push("payments", n);
        }
        queue.push("billing", 100);
        queue.push("orders", 200);
        queue.push("billing", 101);
        let order: Vec<_> = std::iter::from_fn(|| queue.pop()).collect();
        assert_eq!(
            order,
            vec![
                ("payments", 0),
                ("billing", 100),
                ("orders", 200),
                ("payments", 1),
                ("billing", 101),
                ("payments", 2),
                ("payments", 3),
                ("payments", 4),
            ]
        );
        assert!(queue.is_empty());
        assert_eq!(queue.flows.len(), 0, "idle flows are forgotten");
    }

    fn admission(permits: usize) -> (FairAdmission<&'static str, String>, Arc<Mutex<Vec<String>>>) {
        let woken = Arc::new(Mutex::new(Vec::new()));
        let admission = FairAdmission::new(permits, {
            let woken = woken.clone();
            move |work| lock(&woken).push(work)
        });
        (admission, woken)
    }

    #[test]
    fn a_returned_permit_wakes_the_next_flow_in_turn_and_is_kept_for_it() {
        let (admission, woken) = admission(1);
        let held = admission
            .admit("payments", "p0".into())
            .expect("a free permit");
        for n in 1..4 {
            assert!(
                admission.admit("payments", format!("p{n}")).is_none(),
                "no permit is free"
            );
        }
        assert!(admission.admit("billing", "b0".into()).is_none());
        assert!(
            admission.admit("payments", "p1".into()).is_none(),
            "parked once"
        );
        assert_eq!(admission.waiting(), (4, 2, 0));
        drop(held);
        assert_eq!(*lock(&woken), ["p1"], "payments' turn came first");
        // The permit is p1's: nothing else gets it meanwhile.
        assert!(admission.admit("orders", "o0".into()).is_none());
        let first = admission
            .admit("payments", "p1".into())
            .expect("p1's reserved permit");
        drop(first);
        assert_eq!(
            *lock(&woken),
            ["p1", "b0"],
            "billing before payments' backlog"
        );
        let second = admission
            .admit("billing", "b0".into())
            .expect("b0's reserved permit");
        drop(second);
        drop(
            admission
                .admit("payments", "p2".into())
                .expect("payments' next turn"),
        );
        assert_eq!(
            *lock(&woken),
            ["p1", "b0", "p2", "o0"],
            "orders, parked after payments' turn, is served after payments' next one"
        );
        assert_eq!(admission.waiting(), (1, 1, 1));
        assert_eq!(admission.waiting.get(), 2, "parked p3 and woken o0");
    }

    #[test]
    fn work_that_is_gone_passes_its_reserved_permit_on() {
        let (admission, woken) = admission(1);
        let held = admission
            .admit("payments", "p0".into())
            .expect("a free permit");
        assert!(admission.admit("payments", "p1".into()).is_none());
        assert!(admission.admit("billing", "b0".into()).is_none());
        drop(held);
        admission.abandon(&"p1".to_string());
        assert_eq!(*lock(&woken), ["p1", "b0"]);
        drop(
            admission
                .admit("billing", "b0".into())
                .expect("b0's permit"),
        );
        // Nothing waits now: the permit is free, and abandoning unknown work frees no other.
        admission.abandon(&"p1".to_string());
        let again = admission
            .admit("orders", "o0".into())
            .expect("the free permit");
        assert!(
            admission.admit("orders", "o1".into()).is_none(),
            "one permit, not two"
        );
        drop(again);
        assert_eq!(admission.waiting(), (0, 0, 1));
    }
}
