//! Fair queuing between tenants, as the Kubernetes API server's Priority and Fairness does for its
//! own: work waits in one queue per flow (a namespace), and the queues are served round-robin, so a
//! namespace with ten thousand waiting reconciles delays another namespace's next one by at most one
//! turn, whatever the order they arrived in. Fair by construction, not by timing.
//!
//! [`FairQueue`] is the sans-IO order; [`FairSemaphore`] hands out a fixed number of permits in that
//! order (the reconciles that may run at once).

use crate::lock;
use std::collections::{HashMap, VecDeque};
use std::hash::Hash;
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

/// A counting semaphore whose waiters are admitted fairly between flows (see [`FairQueue`]): when a
/// permit comes back, it goes to the next flow in turn, not to the oldest waiter.
#[derive(Debug, Clone)]
pub struct FairSemaphore<K: Clone + Eq + Hash> {
    state: Arc<Mutex<SemaphoreState<K>>>,
}

#[derive(Debug)]
struct SemaphoreState<K: Clone + Eq + Hash> {
    free: usize,
    waiting: FairQueue<K, tokio::sync::oneshot::Sender<FairPermit<K>>>,
}

/// One admitted unit of work; the permit goes back (to the next flow in turn) when it drops.
#[derive(Debug)]
pub struct FairPermit<K: Clone + Eq + Hash> {
    /// `None` once disarmed: a permit that could not be delivered is counted back by hand.
    state: Option<Arc<Mutex<SemaphoreState<K>>>>,
}

impl<K: Clone + Eq + Hash> FairSemaphore<K> {
    /// `permits` units of work at once (at least one).
    pub fn new(permits: usize) -> Self {
        Self {
            state: Arc::new(Mutex::new(SemaphoreState {
                free: permits.max(1),
                waiting: FairQueue::default(),
            })),
        }
    }

    /// Waits for a permit in `flow`'s queue. Dropping the future gives up its place.
    pub async fn acquire(&self, flow: K) -> FairPermit<K> {
        let (sender, receiver) = tokio::sync::oneshot::channel();
        lock(&self.state).waiting.push(flow, sender);
        // Also when permits are free: the queue may hold only waiters that gave up.
        hand_out(&self.state);
        match receiver.await {
            Ok(permit) => permit,
            // Unreachable while the semaphore lives (a sender is dropped unsent only with the whole
            // state); should it happen, the work goes on without a permit rather than be lost.
            Err(_) => FairPermit { state: None },
        }
    }

    /// Waiters, and the flows they are in.
    pub fn waiting(&self) -> (usize, usize) {
        let state = lock(&self.state);
        (state.waiting.len(), state.waiting.flows())
    }
}

/// Gives `state`'s free permits to the waiters in fair order; a waiter that gave up is skipped.
fn hand_out<K: Clone + Eq + Hash>(state: &Arc<Mutex<SemaphoreState<K>>>) {
    let mut guard = lock(state);
    while guard.free > 0 {
        let Some((_, sender)) = guard.waiting.pop() else {
            return;
        };
        guard.free -= 1;
        let permit = FairPermit {
            state: Some(state.clone()),
        };
        if let Err(mut undelivered) = sender.send(permit) {
            // The waiter gave up: its permit is free again (disarmed, so its drop does not lock
            // the state this function holds).
            undelivered.state = None;
            guard.free += 1;
        }
    }
}

impl<K: Clone + Eq + Hash> Drop for FairPermit<K> {
    fn drop(&mut self) {
        if let Some(state) = self.state.take() {
            lock(&state).free += 1;
            hand_out(&state);
        }
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

    /// Polls `future` once: `Some` if it is ready.
    fn poll_once<F: std::future::Future + Unpin>(future: &mut F) -> Option<F::Output> {
        futures::FutureExt::now_or_never(future)
    }

    #[tokio::test]
    async fn a_returned_permit_goes_to_the_next_flow_in_turn() {
        let semaphore = FairSemaphore::new(1);
        let held = semaphore.acquire("payments").await;
        let mut payments: Vec<_> = (0..3)
            .map(|_| Box::pin(semaphore.acquire("payments")))
            .collect();
        let mut billing = Box::pin(semaphore.acquire("billing"));
        for waiter in &mut payments {
            assert!(poll_once(waiter).is_none(), "no permit is free");
        }
        assert!(poll_once(&mut billing).is_none());
        assert_eq!(semaphore.waiting(), (4, 2));
        drop(held);
        let first = poll_once(&mut payments[0]).expect("payments' turn came first");
        assert!(poll_once(&mut billing).is_none(), "one permit, one holder");
        drop(first);
        let second = poll_once(&mut billing).expect("billing is served before payments' backlog");
        assert!(poll_once(&mut payments[1]).is_none());
        drop(second);
        assert!(poll_once(&mut payments[1]).is_some());
    }

    #[tokio::test]
    async fn a_waiter_that_gives_up_loses_no_permit() {
        let semaphore = FairSemaphore::new(1);
        let held = semaphore.acquire("payments").await;
        let mut gave_up = Box::pin(semaphore.acquire("payments"));
        assert!(poll_once(&mut gave_up).is_none());
        drop(gave_up);
        drop(held);
        // The permit was offered to the waiter that gave up and came back: the next one gets it.
        let mut next = Box::pin(semaphore.acquire("billing"));
        assert!(poll_once(&mut next).is_some());
        assert_eq!(semaphore.waiting(), (0, 0));
    }
}
