//! The served namespaces' Deployments, StatefulSets and DaemonSets, compacted, kept by watches: a
//! rotation whose restarts are still pending finds the workloads that use its Secret here instead of
//! listing every workload of the namespace, whole, on every reconcile (#23 hole 5). Until a scope's
//! three watches have listed once (or when RBAC does not allow `watch`), restarts list as before.
//!
//! Only what restarts read is kept (see [`Workload::compacted`]): which Secrets the pod template
//! uses, the operator's own annotations, the selector and the rollout state.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

use futures::StreamExt;
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, StatefulSet};
use kube::Api;
use kube::runtime::{WatchStreamExt, watcher};

use super::{Workload, WorkloadResource};
use crate::api::WorkloadKind;
use crate::lock;

type Key = (String, WorkloadKind, String);

/// Workloads per watch page: a namespace can hold many, each large.
const PAGE: u32 = 100;

#[derive(Default)]
pub struct WorkloadCache {
    workloads: Mutex<HashMap<Key, Workload>>,
    /// (scope, kind) whose watch has listed everything at least once; a scope is `None` for the
    /// whole cluster.
    ready: Mutex<HashSet<(Option<String>, WorkloadKind)>>,
}

impl WorkloadCache {
    /// Every workload of `namespace`, or `None` while no watch that covers it has listed all three
    /// kinds (the caller then asks the API server).
    pub fn workloads_in(&self, namespace: &str) -> Option<Vec<Workload>> {
        let covered = {
            let ready = lock(&self.ready);
            [None, Some(namespace.to_string())]
                .into_iter()
                .any(|scope| {
                    [
                        WorkloadKind::Deployment,
                        WorkloadKind::StatefulSet,
                        WorkloadKind::DaemonSet,
                    ]
                    .into_iter()
                    .all(|kind| ready.contains(&(scope.clone(), kind)))
                })
        };
        covered.then(|| {
            lock(&self.workloads)
                .iter()
                .filter(|((workload_namespace, _, _), _)| workload_namespace == namespace)
                .map(|(_, workload)| workload.clone())
                .collect()
        })
    }

    /// Keeps the three kinds of `scope` (`None`: the whole cluster) until dropped.
    pub async fn watch(&self, client: kube::Client, scope: Option<String>) {
        futures::join!(
            self.watch_kind::<Deployment>(client.clone(), scope.clone()),
            self.watch_kind::<StatefulSet>(client.clone(), scope.clone()),
            self.watch_kind::<DaemonSet>(client, scope),
        );
    }

    async fn watch_kind<K: WorkloadResource>(&self, client: kube::Client, scope: Option<String>) {
        let api: Api<K> = match &scope {
            Some(namespace) => Api::namespaced(client, namespace),
            None => Api::all(client),
        };
        let mut listing: Option<HashMap<Key, Workload>> = None;
        let events = watcher(api, watcher::Config::default().page_size(PAGE)).default_backoff();
        futures::pin_mut!(events);
        while let Some(event) = events.next().await {
            let Ok(event) = event else {
                // Backed off and retried by the watcher. Until it has listed again the cache may
                // miss changes: restarts list instead (and a lasting refusal, such as a role
                // without `watch`, keeps it so).
                lock(&self.ready).remove(&(scope.clone(), K::KIND));
                continue;
            };
            match event {
                watcher::Event::Init => listing = Some(HashMap::new()),
                watcher::Event::InitApply(object) => {
                    if let (Some(listing), Some(key)) = (listing.as_mut(), key_of(&object)) {
                        listing.insert(key, Workload::from(object).compacted());
                    }
                }
                watcher::Event::InitDone => {
                    let listed = listing.take().unwrap_or_default();
                    let mut workloads = lock(&self.workloads);
                    workloads.retain(|(namespace, kind, _), _| {
                        *kind != K::KIND || scope.as_ref().is_some_and(|scope| scope != namespace)
                    });
                    workloads.extend(listed);
                    drop(workloads);
                    lock(&self.ready).insert((scope.clone(), K::KIND));
                }
                watcher::Event::Apply(object) => {
                    if let Some(key) = key_of(&object) {
                        lock(&self.workloads).insert(key, Workload::from(object).compacted());
                    }
                }
                watcher::Event::Delete(object) => {
                    if let Some(key) = key_of(&object) {
                        lock(&self.workloads).remove(&key);
                    }
                }
            }
        }
    }
}

fn key_of<K: WorkloadResource>(object: &K) -> Option<Key> {
    let metadata = object.meta();
    Some((metadata.namespace.clone()?, K::KIND, metadata.name.clone()?))
}
