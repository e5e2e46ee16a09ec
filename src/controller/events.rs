//! Events: published with a Recorder per Event (see [`publish`]); which Event a change deserves is
//! decided in [`super::status::event_for`].

use kube::runtime::events::{Event, EventType, Recorder};
use tracing::warn;

use super::context::Context;
use super::status;

/// Publishes one Event about `reference`; a failure is logged, never fatal to the reconcile.
pub(super) async fn publish(
    context: &Context,
    reference: &k8s_openapi::api::core::v1::ObjectReference,
    event: status::EventToEmit,
) {
    let event = Event {
        type_: if event.warning {
            EventType::Warning
        } else {
            EventType::Normal
        },
        reason: event.reason.to_string(),
        note: Some(event.note),
        action: "Sync".to_string(),
        secondary: None,
    };
    // A Recorder per Event: a long-lived one caches every Event it published for six minutes (to
    // aggregate repeats into series) in a table that never shrinks, which at 10,000 identities was
    // the operator's largest allocation (heap profile in BENCHMARKS.md). Repeats are already
    // decided away (`decide`: an Event per transition), so nothing is lost.
    let recorder = Recorder::new(context.client.clone(), context.reporter.clone());
    if let Err(error) = recorder.publish(&event, reference).await {
        warn!(error = %error, "could not publish an Event");
    }
}
