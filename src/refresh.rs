//! `mtls-operator refresh`: ask the operator to check an identity's source now and read it where
//! needed (after fixing an IAM policy, a KMS grant or a bad version), as External Secrets
//! Operator's `force-sync` annotation or `cmctl renew` do. It sets the identity's
//! `mtls-operator.io/refresh-requested-at` annotation to the current time; with `--wait` it waits
//! until status says the request was honoured and prints how it ended. Exit 0: requested (and with
//! `--wait`, honoured and Ready); 1 otherwise.

use std::time::Duration;

use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::{Client, ResourceExt};

use crate::api::{MtlsIdentity, REFRESH_ANNOTATION, duration_flag, refresh_value};

#[derive(clap::Args, Debug)]
#[command(group = clap::ArgGroup::new("which").required(true).multiple(false)
    .args(["name", "all"]))]
pub struct RefreshArgs {
    /// The MtlsIdentity to refresh.
    name: Option<String>,
    /// Every MtlsIdentity in the namespace.
    #[arg(long)]
    all: bool,
    /// The identities' namespace (default: the kubeconfig context's).
    #[arg(short, long)]
    namespace: Option<String>,
    /// Wait until the operator honoured the request, and print each identity's Ready condition.
    #[arg(long)]
    wait: bool,
    /// How long `--wait` waits at most.
    #[arg(long, default_value = "60s", value_parser = duration_flag, requires = "wait")]
    timeout: Duration,
}

/// Runs the verb; `Ok(false)`: a request was not honoured in time, or ended not Ready.
pub async fn run(args: RefreshArgs) -> anyhow::Result<bool> {
    let client = Client::try_default().await?;
    let namespace = args
        .namespace
        .clone()
        .unwrap_or_else(|| client.default_namespace().to_string());
    let identities: Api<MtlsIdentity> = Api::namespaced(client, &namespace);
    let names = match &args.name {
        Some(name) => vec![name.clone()],
        None => identities
            .list(&ListParams::default())
            .await?
            .items
            .iter()
            .map(ResourceExt::name_any)
            .collect(),
    };
    // Milliseconds: two requests in the same second are two requests.
    let requested =
        refresh_value(&chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true));
    let patch = serde_json::json!({
        "metadata": {"annotations": {REFRESH_ANNOTATION: requested}}
    });
    for name in &names {
        // A merge patch: only this annotation changes.
        identities
            .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .map_err(|error| {
                anyhow::anyhow!("cannot request a refresh of {namespace}/{name}: {error}")
            })?;
        println!("{namespace}/{name}: refresh requested at {requested}");
    }
    if !args.wait {
        return Ok(true);
    }
    let deadline = tokio::time::Instant::now() + args.timeout;
    let mut all_ready = true;
    for name in &names {
        let honoured = loop {
            let identity = identities.get(name).await?;
            let honoured = identity
                .status
                .as_ref()
                .and_then(|status| status.last_refresh.as_ref())
                .is_some_and(|refresh| refresh.requested == requested);
            if honoured {
                break Some(identity);
            }
            if tokio::time::Instant::now() >= deadline {
                break None;
            }
            tokio::time::sleep(Duration::from_millis(250)).await; // a poll period, not a condition
        };
        match honoured.as_ref().and_then(MtlsIdentity::ready_condition) {
            Some(ready) => {
                all_ready &= ready.status == "True";
                println!(
                    "{namespace}/{name}: honoured; Ready={} {}: {}",
                    ready.status, ready.reason, ready.message
                );
            }
            None => {
                all_ready = false;
                println!(
                    "{namespace}/{name}: not honoured within {} (is the operator running and \
                     watching this namespace?)",
                    humantime::format_duration(args.timeout)
                );
            }
        }
    }
    Ok(all_ready)
}
