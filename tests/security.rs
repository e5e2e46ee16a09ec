//! The tenancy boundary under attack, on the real control plane and moto: each test sends what an
//! attacker in one namespace would (the manifest, the timing) and asserts the safe outcome: the
//! reason, no Secret, no foreign object changed, no rollout elsewhere.

mod common;
// Availability between namespaces under attack (#23), in this binary: one link step fewer.
#[path = "security/fairness.rs"]
mod fairness;

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use common::endpoint::Mode;
use common::*;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use mtls_operator::api::MtlsIdentity;
use mtls_operator::controller::Settings;
use mtls_operator::restart::RestartLimits;
use xtask::support::{self, wait_for};

/// The canonical ARN moto gives `name`, and the operator's own account and region.
async fn arn_of(name: &str) -> Result<String> {
    let described = support::secrets_manager()
        .await
        .describe_secret()
        .secret_id(name)
        .send()
        .await?;
    described.arn.context("no ARN")
}

fn region() -> String {
    std::env::var("AWS_REGION").unwrap_or_else(|_| "us-east-1".into())
}

/// Asserts that no Secret named `name` exists in `namespace`.
async fn assert_no_secret(namespace: &str, name: &str) -> Result<()> {
    ensure!(
        get_secret(namespace, name).await?.is_none(),
        "Secret {namespace}/{name} must not exist"
    );
    Ok(())
}

/// A victim namespace whose certificate the attacker wants: `{victim}/api-client` and `{victim}/ca`.
async fn victim() -> Result<(String, TestCa)> {
    let victim = support::create_namespace("billing", &[]).await?;
    let ca = TestCa::new("billing CA")?;
    put_source(&format!("{victim}/api-client"), &good_secret(&ca)?).await?;
    put_source(&format!("{victim}/ca"), &ca.pem()).await?;
    Ok((victim, ca))
}

#[tokio::test]
async fn forged_ids_cannot_read_another_namespaces_secret() -> Result<()> {
    let (victim, ca) = victim().await?;
    // What the `resolved` attack makes Secrets Manager answer with: another of the victim's
    // secrets, so that the two asked for by name stay unasked.
    put_source(&format!("{victim}/resolved"), &good_secret(&ca)?).await?;
    let resolved_arn = arn_of(&format!("{victim}/resolved")).await?;
    let namespace = support::create_namespace("payments", &[]).await?;
    // Every request the operator sends is seen at the endpoint, to show that the refused ids
    // were refused before any call.
    let endpoint = counting_endpoint(Mode::Pass).await?;
    let _operator = start_operator_through(&endpoint, &[&namespace], Settings::default()).await?;
    let own = put_source(
        &format!("{namespace}/x"),
        &good_secret(&TestCa::new("own")?)?,
    )
    .await;
    own?;
    let victim_arn = arn_of(&format!("{victim}/api-client")).await?;
    let account = victim_arn
        .split(':')
        .nth(4)
        .context("account in ARN")?
        .to_string();
    let region = region();
    let arn = |account: &str, region: &str, resource: &str| {
        format!("arn:aws:secretsmanager:{region}:{account}:secret:{resource}")
    };
    // (identity name, secretId, expected reason)
    let attacks = [
        // Hole 1, as reported: a colon makes the policy and Secrets Manager read different names.
        (
            "colon",
            arn(
                &account,
                &region,
                &format!("{namespace}/x:{victim}/api-client"),
            ),
            "InvalidSpec",
        ),
        // Partial and full ARNs of the victim's secret.
        (
            "partial",
            arn(&account, &region, &format!("{victim}/api-client")),
            "SourceNotAllowed",
        ),
        ("full", victim_arn.clone(), "SourceNotAllowed"),
        // Glob characters in names are not names.
        ("star", format!("{namespace}/*"), "InvalidSpec"),
        ("question", format!("{namespace}/?"), "InvalidSpec"),
        ("brace", format!("{namespace}/{{namespace}}"), "InvalidSpec"),
        // Secrets Manager does not normalise paths: a literal name that does not exist.
        (
            "dotdot",
            format!("{namespace}/../{victim}/api-client"),
            "SourceNotFound",
        ),
        // Hole 2: another account's secret under the namespace's own prefix.
        (
            "account",
            arn("999999999999", &region, &format!("{namespace}/x-AbCdEf")),
            "SourceNotAllowed",
        ),
        // The operator's account and region, but another partition (#25): another account.
        (
            "partition",
            format!("arn:aws-us-gov:secretsmanager:{region}:{account}:secret:{namespace}/x-AbCdEf"),
            "SourceNotAllowed",
        ),
        // Hole 2: another region.
        (
            "arn-region",
            arn(&account, "eu-central-1", &format!("{namespace}/x-AbCdEf")),
            "SourceNotAllowed",
        ),
        // Hole 1, second end: the id is allowed, but Secrets Manager answers with the victim's
        // secret (the fault injector makes it resolve elsewhere): refused on the returned ARN.
        (
            "resolved",
            format!("{namespace}{RESOLVES_TO}{victim}/resolved"),
            "SourceNotAllowed",
        ),
    ];
    for (name, secret_id, _) in &attacks {
        create_identity(
            &namespace,
            &identity(name, secret_id, serde_json::json!({}))?,
        )
        .await?;
    }
    // spec.source.region outside the allowed regions, and caSecretId of the victim.
    create_identity(
        &namespace,
        &identity(
            "region",
            &format!("{namespace}/x"),
            serde_json::json!({"source": {"secretId": format!("{namespace}/x"), "region": "eu-central-1"}}),
        )?,
    )
    .await?;
    put_source(&format!("{namespace}/bundle"), &{
        let ca = TestCa::new("bundle")?;
        let leaf = ca.leaf(&LeafOptions::default())?;
        format!("{}{}", leaf.cert_pem, leaf.key_pem)
    })
    .await?;
    create_identity(
        &namespace,
        &identity(
            "ca",
            &format!("{namespace}/bundle"),
            serde_json::json!({"source": {
                "secretId": format!("{namespace}/bundle"),
                "format": "Pem",
                "caSecretId": format!("{victim}/ca"),
            }}),
        )?,
    )
    .await?;

    let all = attacks
        .iter()
        .map(|(name, _, reason)| (*name, *reason))
        .chain([("region", "SourceNotAllowed"), ("ca", "SourceNotAllowed")]);
    for (name, reason) in all {
        let refused = wait_ready(&namespace, name, "False", reason).await?;
        assert_no_secret(&namespace, name).await?;
        let status = refused.status.clone().unwrap_or_default();
        ensure!(status.certificate.is_none(), "{name}: no certificate facts");
        let message = &refused.ready_condition().context("Ready")?.message;
        // The refusal names neither the policy's patterns nor the victim's resolved secret.
        ensure!(
            !message.contains("allowed:") && !message.contains("{namespace}/*"),
            "{message}"
        );
        // Nor what Secrets Manager resolved the id to.
        if name == "resolved" {
            ensure!(!message.contains(&resolved_arn), "{message}");
        }
        wait_event(&namespace, name, reason).await?;
    }
    // Refused before any call: no request asked Secrets Manager for the victim's key or CA, by
    // name, partial ARN or full ARN (`dotdot` asks for a literal name that is none of them).
    let ca_arn = arn_of(&format!("{victim}/ca")).await?;
    let victim_ids = [
        format!("{victim}/api-client"),
        format!("{victim}/ca"),
        arn(&account, &region, &format!("{victim}/api-client")),
        arn(&account, &region, &format!("{victim}/ca")),
        victim_arn.clone(),
        ca_arn,
    ];
    let asked = endpoint.requests_for(&victim_ids);
    ensure!(
        asked.is_empty(),
        "requests for the victim's secrets reached the endpoint: {asked:?}"
    );
    // The control: the namespace's own secret, by name and by its full ARN, is synced.
    let own_arn = arn_of(&format!("{namespace}/x")).await?;
    create_identity(
        &namespace,
        &identity("own-name", &format!("{namespace}/x"), serde_json::json!({}))?,
    )
    .await?;
    create_identity(
        &namespace,
        &identity("own-arn", &own_arn, serde_json::json!({}))?,
    )
    .await?;
    wait_ready(&namespace, "own-name", "True", "Synced").await?;
    let synced = wait_ready(&namespace, "own-arn", "True", "Synced").await?;
    ensure!(
        synced.status.and_then(|s| s.source).map(|s| s.arn) == Some(own_arn),
        "the status shows the canonical ARN"
    );
    Ok(())
}

#[tokio::test]
async fn the_crd_refuses_unbounded_and_malformed_fields() -> Result<()> {
    let namespace = support::create_namespace("crd-limits", &[]).await?;
    install_crd_and_rbac().await?;
    let identities: Api<MtlsIdentity> = Api::namespaced(support::admin_client().await?, &namespace);
    let long = "a".repeat(300);
    let bad_specs = [
        serde_json::json!({"source": {"secretId": format!("{namespace}/x"), "region": "../../x"}}),
        serde_json::json!({"source": {"secretId": format!("{namespace}/x"), "region": long.clone()}}),
        serde_json::json!({"source": {"secretId": format!("{namespace}/x"), "fields": {"certificate": long.clone()}}}),
        serde_json::json!({"source": {"secretId": format!("{namespace}/x"), "format": "Pem", "caSecretId": "c".repeat(3000)}}),
        serde_json::json!({"source": {"secretId": format!("{namespace}/x"), "versionStage": "AWS CURRENT"}}),
        serde_json::json!({"source": {"secretId": format!("{namespace}/x")}, "refreshInterval": "0s"}),
        // A password reference that is a path to another namespace's Secret, or a bad key.
        serde_json::json!({"source": {"secretId": format!("{namespace}/x")}, "target": {"keystores": {"pkcs12":
            {"passwordSecretRef": {"name": "../../kube-system/secrets/admin", "key": "password"}}}}}),
        serde_json::json!({"source": {"secretId": format!("{namespace}/x")}, "target": {"keystores": {"pkcs12":
            {"passwordSecretRef": {"name": "pass", "key": "a/../b"}}}}}),
        serde_json::json!({"source": {"secretId": format!("{namespace}/x"), "format": "Pkcs12",
            "passwordSecretRef": {"name": "other-ns/pass", "key": "password"}}}),
        // A password for a format other than Pkcs12.
        serde_json::json!({"source": {"secretId": format!("{namespace}/x"),
            "passwordSecretRef": {"name": "pass", "key": "password"}}}),
        // A role that is not a role ARN, or glob syntax in one; an external id without a role.
        serde_json::json!({"source": {"secretId": format!("{namespace}/x"),
            "roleArn": "arn:aws:iam::111111111111:user/admin"}}),
        serde_json::json!({"source": {"secretId": format!("{namespace}/x"),
            "roleArn": "arn:aws:iam::111111111111:role/mtls/*"}}),
        serde_json::json!({"source": {"secretId": format!("{namespace}/x"),
            "externalId": "tenant-external-id"}}),
        // Padded NetworkPolicy peers (Kubernetes' own type bounds none of its lists, maps or
        // strings): too many labels, a label value of a megabyte's kind, too many CIDRs.
        serde_json::json!({"source": {"secretId": format!("{namespace}/x")},
            "egress": {"upstream": "https://partner.example", "allowFrom": [{"podSelector":
                {"matchLabels": (0..21).map(|i| (format!("k{i}"), serde_json::json!("v")))
                    .collect::<serde_json::Map<_, _>>()}}]}}),
        serde_json::json!({"source": {"secretId": format!("{namespace}/x")},
            "egress": {"upstream": "https://partner.example", "allowFrom": [{"podSelector":
                {"matchLabels": {"app": "v".repeat(400)}}}]}}),
        serde_json::json!({"source": {"secretId": format!("{namespace}/x")},
            "egress": {"upstream": "https://partner.example", "allowFrom": [{"ipBlock":
                {"cidr": "10.0.0.0/8", "except": (0..21).map(|i| format!("10.{i}.0.0/16"))
                    .collect::<Vec<_>>()}}]}}),
    ];
    let source = serde_json::json!({"source": {"secretId": format!("{namespace}/x")}});
    let egress = serde_json::json!({"source": {"secretId": format!("{namespace}/x")},
        "egress": {"upstream": "https://partner.example"}});
    let bad_names = [
        // A label value holds 63 characters at most.
        ("n".repeat(64), source.clone()),
        // With egress the name is a Service's: no dots.
        ("with.dots".to_string(), egress.clone()),
    ];
    let named = bad_specs
        .into_iter()
        .enumerate()
        .map(|(index, spec)| (format!("bad-{index}"), spec))
        .chain(bad_names);
    for (name, spec) in named {
        let object = identity(&name, &format!("{namespace}/x"), spec.clone())?;
        let created = identities.create(&PostParams::default(), &object).await;
        match created {
            Err(kube::Error::Api(status)) => {
                ensure!(status.code == 422, "{name} {spec}: {status:?}")
            }
            other => {
                anyhow::bail!("{name} {spec} must be refused by the API server, got {other:?}")
            }
        }
    }
    // The limits refuse only what they must: 63 characters, and dots without egress, are fine.
    let peers = serde_json::json!({"source": {"secretId": format!("{namespace}/x")},
        "egress": {"upstream": "https://partner.example", "allowFrom": [{"podSelector":
            {"matchLabels": {"app.kubernetes.io/name": "client"}}}]}});
    for (name, spec) in [
        ("n".repeat(63), source.clone()),
        ("with.dots".to_string(), source),
        ("bounded-peers".to_string(), peers),
    ] {
        identities
            .create(
                &PostParams::default(),
                &identity(&name, &format!("{namespace}/x"), spec)?,
            )
            .await
            .with_context(|| format!("{name} must be accepted"))?;
    }
    Ok(())
}

#[tokio::test]
async fn a_foreign_secret_created_during_the_fetch_is_not_taken_over() -> Result<()> {
    let (namespace, operator, ca) = Scenario::start("race").await?.parts();
    let secret_id = format!("{namespace}{SLOW}");
    put_source(&secret_id, &good_secret(&ca)?).await?;
    create_identity(
        &namespace,
        &identity("client", &secret_id, serde_json::json!({}))?,
    )
    .await?;
    // The operator has looked at the target (absent) and is now waiting for Secrets Manager: the
    // attacker creates a Secret with the target's name in that window.
    operator.wait_slow_fetch_started().await?;
    let foreign: Secret = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "client"},
        "stringData": {"owner": "someone else"}
    }))?;
    let secrets: Api<Secret> = Api::namespaced(support::admin_client().await?, &namespace);
    let created = secrets.create(&PostParams::default(), &foreign).await?;
    wait_ready(&namespace, "client", "False", "TargetConflict").await?;
    let after = secrets.get("client").await?;
    ensure!(
        after.metadata.resource_version == created.metadata.resource_version,
        "the foreign Secret was modified"
    );
    ensure!(after.metadata.owner_references.is_none(), "no owner added");
    ensure!(
        secret_data(&after, "tls.key").is_none(),
        "no key written into it"
    );
    Ok(())
}

#[tokio::test]
async fn edits_of_the_target_do_not_drive_aws_calls_and_deletion_forgets_the_identity() -> Result<()>
{
    let (namespace, operator, ca) = Scenario::start("edit-storm").await?.parts();
    let secret_id = format!("{namespace}/client");
    put_source(&secret_id, &good_secret(&ca)?).await?;
    let spec = serde_json::json!({"refreshInterval": "1h"});
    create_identity(&namespace, &identity("client", &secret_id, spec)?).await?;
    wait_ready(&namespace, "client", "True", "Synced").await?;
    let text = operator.metrics.encode();
    ensure!(
        text.contains(&format!("namespace=\"{namespace}\",name=\"client\"")),
        "{text}"
    );

    // Edits of the Secret's data, one after another as soon as the last was repaired: each is a
    // watch event on an owned Secret that no longer matches what the operator wrote, so each
    // wants a read to repair it. After the budget's burst of 5 the next repair must be put off.
    let secrets: Api<Secret> = Api::namespaced(support::admin_client().await?, &namespace);
    let good = get_secret(&namespace, "client").await?.context("Secret")?;
    let good_certificate = secret_data(&good, "tls.crt").context("tls.crt")?;
    let deferred = || metric(&operator, "mtls_source_reads_deferred_total");
    let repaired = || async {
        let secret = get_secret(&namespace, "client").await?.context("Secret")?;
        anyhow::Ok(secret_data(&secret, "tls.crt").as_deref() == Some(good_certificate.as_str()))
    };
    let (before, deferred_before) = (operator.source.calls(), deferred());
    let mut edits = 0u64;
    let mut repaired_before_deferral = 0u64;
    while deferred() == deferred_before && edits < 10 {
        let patch = serde_json::json!({"stringData": {"tls.crt": format!("edited {edits}")}});
        secrets
            .patch("client", &PatchParams::default(), &Patch::Merge(&patch))
            .await?;
        edits += 1;
        wait_for(
            "the edit repaired or its repair put off",
            TIMEOUT,
            || async {
                ensure!(
                    deferred() > deferred_before || repaired().await?,
                    "neither yet"
                );
                Ok(())
            },
        )
        .await?;
        if deferred() == deferred_before {
            repaired_before_deferral += 1;
        }
    }
    ensure!(
        deferred() > deferred_before,
        "{edits} repairs in a row, none put off: the budget never engaged"
    );
    ensure!(
        repaired_before_deferral >= 4,
        "a repair was put off after {repaired_before_deferral}: the burst is 5, the first sync took one"
    );
    // Repaired all the same once the budget allows, from one more read.
    wait_for("the last edit to be repaired", TIMEOUT, || async {
        ensure!(repaired().await?, "tls.crt still edited");
        Ok(())
    })
    .await?;
    let calls = operator.source.calls() - before;
    ensure!(
        calls <= edits,
        "{calls} Secrets Manager calls for {edits} edits: more than one read per repair"
    );

    let identities: Api<MtlsIdentity> = Api::namespaced(support::admin_client().await?, &namespace);
    identities
        .delete("client", &DeleteParams::default())
        .await?;
    wait_for("the identity's metric series to go", TIMEOUT, || async {
        let text = operator.metrics.encode();
        ensure!(
            !text.contains(&format!("namespace=\"{namespace}\",name=\"client\"")),
            "still exported"
        );
        Ok(())
    })
    .await?;
    Ok(())
}

/// The attack: the identity's Secret is replaced by someone else's under the same name while the
/// operator is away, and the identity's target is renamed, so that the operator, cleaning up the
/// old name, deletes the foreign Secret. It must delete only a Secret it owns.
#[tokio::test]
async fn a_renamed_target_whose_old_name_holds_a_foreign_secret_leaves_it() -> Result<()> {
    let (namespace, operator, ca) = Scenario::start("rename-foreign").await?.parts();
    let id = format!("{namespace}/client");
    put_source(&id, &good_secret(&ca)?).await?;
    create_identity(&namespace, &identity("client", &id, serde_json::json!({}))?).await?;
    wait_ready(&namespace, "client", "True", "Synced").await?;
    drop(operator);

    let admin = support::admin_client().await?;
    let secrets: Api<Secret> = Api::namespaced(admin.clone(), &namespace);
    secrets.delete("client", &DeleteParams::default()).await?;
    wait_for("the operator's Secret to go", TIMEOUT, || async {
        ensure!(secrets.get_opt("client").await?.is_none(), "still there");
        Ok(())
    })
    .await?;
    let foreign: Secret = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "client", "labels": {"owner": "someone-else"}},
        "stringData": {"config": "theirs"}
    }))?;
    let foreign = secrets.create(&PostParams::default(), &foreign).await?;
    let patch = serde_json::json!({"spec": {"target": {"secretName": "client-v2"}}});
    Api::<MtlsIdentity>::namespaced(admin, &namespace)
        .patch("client", &PatchParams::default(), &Patch::Merge(&patch))
        .await?;

    let operator = start_operator(&namespace).await?;
    let reconciled = syncs(&operator);
    wait_for("the renamed target to be synced", TIMEOUT, || async {
        let identity = Api::<MtlsIdentity>::namespaced(support::admin_client().await?, &namespace)
            .get("client")
            .await?;
        let status = identity.status.clone().unwrap_or_default();
        ensure!(
            status.secret_name.as_deref() == Some("client-v2")
                && identity
                    .ready_condition()
                    .is_some_and(|c| c.status == "True"),
            "{status:?}"
        );
        Ok(())
    })
    .await?;
    ensure!(
        get_secret(&namespace, "client-v2").await?.is_some(),
        "no new Secret"
    );
    // The reconcile that renamed, and the one the old Secret's deletion asked for, have run.
    wait_reconciles(&operator, reconciled, 2).await?;
    let still = secrets
        .get_opt("client")
        .await?
        .context("the foreign Secret was deleted")?;
    ensure!(
        still.metadata.uid == foreign.metadata.uid
            && still.metadata.resource_version == foreign.metadata.resource_version,
        "the foreign Secret was deleted or changed"
    );
    ensure!(
        still.metadata.owner_references.is_none(),
        "the foreign Secret was adopted"
    );
    Ok(())
}

#[tokio::test]
async fn errors_shown_to_the_tenant_do_not_carry_aws_details() -> Result<()> {
    let namespace = support::create_namespace("disclosure", &[]).await?;
    let _operator = start_operator(&namespace).await?;
    let secret_id = format!("{namespace}/fault-access-denied");
    create_identity(
        &namespace,
        &identity("client", &secret_id, serde_json::json!({}))?,
    )
    .await?;
    let denied = wait_ready(&namespace, "client", "False", "AccessDenied").await?;
    let message = denied.ready_condition().context("Ready")?.message.clone();
    ensure!(message.contains(&secret_id), "names the secret: {message}");
    ensure!(
        message.contains("secretsmanager:GetSecretValue"),
        "says what to do: {message}"
    );
    // The injected AWS message names the role and account: it must stay in the operator's log.
    ensure!(!message.contains(INJECTED_ROLE_ARN), "{message}");
    let event = wait_event(&namespace, "client", "AccessDenied").await?;
    let note = event.note.unwrap_or_default();
    ensure!(!note.contains(INJECTED_ROLE_ARN), "{note}");
    Ok(())
}

/// A Deployment whose pods never become ready: its node selector matches no node.
async fn create_stuck_deployment(namespace: &str, name: &str, secret: &str) -> Result<()> {
    let mut template = pod_template(name, Some(("volume", secret)));
    template["spec"]["nodeSelector"] = serde_json::json!({"no-such-node": "true"});
    let deployment: Deployment = serde_json::from_value(serde_json::json!({
        "metadata": {"name": name},
        "spec": {"replicas": 1, "selector": {"matchLabels": {"app": name}}, "template": template}
    }))?;
    Api::<Deployment>::namespaced(support::admin_client().await?, namespace)
        .create(&PostParams::default(), &deployment)
        .await?;
    Ok(())
}

#[tokio::test]
async fn a_namespace_of_never_ready_workloads_cannot_block_other_namespaces_rollouts() -> Result<()>
{
    let evil = support::create_namespace("evil", &[]).await?;
    let payments = support::create_namespace("fair", &[]).await?;
    let settings = Settings {
        restart_limits: RestartLimits {
            max_rollouts: 4,
            max_per_namespace: 3,
            deadline: Duration::from_secs(40),
        },
        ..Settings::default()
    };
    let _operator = start_operator_for(&[&evil, &payments], settings).await?;
    let ca = TestCa::new("fair CA")?;
    for namespace in [&evil, &payments] {
        put_source(&format!("{namespace}/client"), &good_secret(&ca)?).await?;
        create_identity(
            namespace,
            &identity(
                "client",
                &format!("{namespace}/client"),
                serde_json::json!({}),
            )?,
        )
        .await?;
        wait_ready(namespace, "client", "True", "Synced").await?;
    }
    for index in 0..4 {
        create_stuck_deployment(&evil, &format!("stuck-{index}"), "client").await?;
    }
    create_deployment(&payments, "api", Some(("volume", "client"))).await?;
    wait_all_rolled_out(&payments).await?;

    // Evil rotates first and fills its share with rollouts that never finish.
    let evil_version = put_source(&format!("{evil}/client"), &good_secret(&ca)?).await?;
    wait_for("evil's rollouts to start", ROLLOUT_TIMEOUT, || async {
        let rolled = generations(&evil)
            .await?
            .values()
            .filter(|g| **g > 1)
            .count();
        ensure!(
            rolled == 3,
            "{rolled} of 4 stuck Deployments rolled (share is 3)"
        );
        Ok(())
    })
    .await?;
    // Payments still rolls, although evil holds rollouts that never become ready.
    let before = generations(&payments).await?;
    let version = put_source(&format!("{payments}/client"), &good_secret(&ca)?).await?;
    let rotation = wait_rotation(&payments, "client", &version).await?;
    ensure!(
        rotation.restarted_workloads == vec!["Deployment/api".to_string()],
        "{rotation:?}"
    );
    let after = generations(&payments).await?;
    ensure!(
        after["Deployment/api"] == before["Deployment/api"] + 1,
        "one rollout: {before:?} {after:?}"
    );
    // ... while evil still held its slots: none stalled yet, its fourth still waiting.
    let evil_rolled = generations(&evil)
        .await?
        .values()
        .filter(|g| **g > 1)
        .count();
    ensure!(
        evil_rolled == 3,
        "evil's slots were still held ({evil_rolled} rolled)"
    );
    let stalled_yet = Api::<k8s_openapi::api::events::v1::Event>::namespaced(
        support::admin_client().await?,
        &evil,
    )
    .list(&ListParams::default())
    .await?
    .items
    .iter()
    .any(|event| event.reason.as_deref() == Some("RestartStalled"));
    ensure!(
        !stalled_yet,
        "payments rolled only because evil's rollouts hit the deadline"
    );
    // After the deadline evil's slots are released (RestartStalled) and its last workload rolls.
    // (The deadline is 40 s after evil's rollouts started, within wait_event's 60 s.)
    wait_event(&evil, "client", "RestartStalled").await?;
    wait_for(
        "evil's fourth rollout after the deadline",
        ROLLOUT_TIMEOUT,
        || async {
            let rolled = generations(&evil)
                .await?
                .values()
                .filter(|g| **g > 1)
                .count();
            ensure!(rolled == 4, "{rolled} of 4");
            Ok(())
        },
    )
    .await?;
    let identities: Api<MtlsIdentity> = Api::namespaced(support::admin_client().await?, &evil);
    let evil_rotation = identities
        .get("client")
        .await?
        .status
        .and_then(|s| s.last_rotation);
    ensure!(
        evil_rotation.is_some_and(|r| r.to_version_id == evil_version),
        "evil's rotation is recorded"
    );
    Ok(())
}

#[tokio::test]
async fn listed_workloads_that_do_not_use_the_secret_are_not_restarted() -> Result<()> {
    let (namespace, _operator, ca) = Scenario::start("listed").await?.parts();
    let secret_id = format!("{namespace}/client");
    put_source(&secret_id, &good_secret(&ca)?).await?;
    // The attacker lists a workload that has nothing to do with the certificate.
    let spec = serde_json::json!({"restart": {"workloads": [
        {"kind": "Deployment", "name": "user"},
        {"kind": "Deployment", "name": "bystander"}
    ]}});
    create_identity(&namespace, &identity("client", &secret_id, spec)?).await?;
    wait_ready(&namespace, "client", "True", "Synced").await?;
    create_deployment(&namespace, "user", Some(("volume", "client"))).await?;
    create_deployment(&namespace, "bystander", None).await?;
    wait_all_rolled_out(&namespace).await?;
    let before = generations(&namespace).await?;
    let version = put_source(&secret_id, &good_secret(&ca)?).await?;
    let rotation = wait_rotation(&namespace, "client", &version).await?;
    ensure!(
        rotation.restarted_workloads == vec!["Deployment/user".to_string()],
        "{rotation:?}"
    );
    let event = wait_event(&namespace, "client", "WorkloadNotUsingSecret").await?;
    ensure!(
        event
            .note
            .unwrap_or_default()
            .contains("Deployment/bystander")
    );
    let after = generations(&namespace).await?;
    ensure!(
        after["Deployment/bystander"] == before["Deployment/bystander"],
        "bystander untouched"
    );
    ensure!(
        after["Deployment/user"] == before["Deployment/user"] + 1,
        "user rolled once"
    );
    Ok(())
}

/// The attack: `restart.force` (restart listed workloads even if they do not use the Secret) names
/// a Deployment that exists only in another namespace the same operator serves. `force` reaches
/// only the identity's own namespace: the victim's Deployment of that name never rolls.
#[tokio::test]
async fn restart_force_reaches_no_other_namespace() -> Result<()> {
    let victim = support::create_namespace("billing", &[]).await?;
    let namespace = support::create_namespace("payments", &[]).await?;
    let operator = start_operator_for(&[&namespace, &victim], Settings::default()).await?;
    create_deployment(&victim, "api", None).await?;
    wait_all_rolled_out(&victim).await?;
    let victim_before = generations(&victim).await?;
    let ca = TestCa::new("force CA")?;
    let secret_id = format!("{namespace}/client");
    put_source(&secret_id, &good_secret(&ca)?).await?;
    let spec = serde_json::json!({"restart": {"force": true, "workloads": [
        {"kind": "Deployment", "name": "api"}
    ]}});
    create_identity(&namespace, &identity("client", &secret_id, spec)?).await?;
    wait_ready(&namespace, "client", "True", "Synced").await?;
    let reconciled = syncs(&operator);
    let version = put_source(&secret_id, &good_secret(&ca)?).await?;
    let rotation = wait_rotation(&namespace, "client", &version).await?;
    ensure!(
        rotation.restarted_workloads.is_empty(),
        "restarted: {rotation:?}"
    );
    // The rotation's reconcile has run (its own write asks for no other).
    wait_reconciles(&operator, reconciled, 1).await?;
    ensure!(
        generations(&victim).await? == victim_before,
        "the victim's Deployment rolled"
    );
    Ok(())
}

/// Pods of `namespace` by name, with their annotations.
async fn pod_annotations(namespace: &str) -> Result<BTreeMap<String, BTreeMap<String, String>>> {
    let pods: Api<Pod> = Api::namespaced(support::admin_client().await?, namespace);
    Ok(pods
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .map(|pod| {
            (
                pod.metadata.name.clone().unwrap_or_default(),
                pod.metadata.annotations.clone().unwrap_or_default(),
            )
        })
        .collect())
}

#[tokio::test]
async fn annotate_touches_only_the_workloads_own_pods() -> Result<()> {
    let namespace = support::create_namespace("annotate-scope", &[]).await?;
    let settings = Settings {
        allow_annotate: true,
        ..Settings::default()
    };
    let _operator = start_operator_with(&namespace, settings).await?;
    let ca = TestCa::new("scope CA")?;
    let secret_id = format!("{namespace}/client");
    put_source(&secret_id, &good_secret(&ca)?).await?;
    let spec = serde_json::json!({"restart": {"policy": "Annotate"}});
    create_identity(&namespace, &identity("client", &secret_id, spec)?).await?;
    wait_ready(&namespace, "client", "True", "Synced").await?;
    // `reloader` selects app=shared AND tier in (a); `other`'s pods carry app=shared too.
    let mut template = pod_template("shared", Some(("volume", "client")));
    template["metadata"]["labels"]["tier"] = "a".into();
    let reloader: Deployment = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "reloader"},
        "spec": {"replicas": 1, "template": template, "selector": {
            "matchLabels": {"app": "shared"},
            "matchExpressions": [{"key": "tier", "operator": "In", "values": ["a"]}]
        }}
    }))?;
    let mut other_template = pod_template("shared", None);
    other_template["metadata"]["labels"]["tier"] = "b".into();
    let other: Deployment = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "other"},
        "spec": {"replicas": 1, "template": other_template, "selector": {
            "matchLabels": {"app": "shared", "tier": "b"}
        }}
    }))?;
    let deployments: Api<Deployment> = Api::namespaced(support::admin_client().await?, &namespace);
    deployments
        .create(&PostParams::default(), &reloader)
        .await?;
    deployments.create(&PostParams::default(), &other).await?;
    // And a Pod of someone else's that carries exactly `reloader`'s labels, owned by nothing.
    let mut stray: Pod = serde_json::from_value(template.clone())?;
    stray.metadata.name = Some("stray".into());
    Api::<Pod>::namespaced(support::admin_client().await?, &namespace)
        .create(&PostParams::default(), &stray)
        .await?;
    wait_all_rolled_out(&namespace).await?;
    let version = put_source(&secret_id, &good_secret(&ca)?).await?;
    wait_rotation(&namespace, "client", &version).await?;
    let key = "mtls-operator.io/cert.client";
    let annotations = pod_annotations(&namespace).await?;
    let (annotated, untouched): (Vec<_>, Vec<_>) = annotations
        .iter()
        .partition(|(_, annotations)| annotations.contains_key(key));
    ensure!(
        annotated.len() == 1 && annotated[0].0.starts_with("reloader-"),
        "only reloader's pod: {annotations:?}"
    );
    ensure!(
        untouched
            .iter()
            .all(|(name, _)| name.starts_with("other-") || *name == "stray"),
        "{annotations:?}"
    );
    ensure!(
        untouched.iter().any(|(name, _)| *name == "stray"),
        "the stray Pod is listed and untouched: {annotations:?}"
    );
    Ok(())
}

#[tokio::test]
async fn annotate_is_refused_unless_the_operator_enables_it() -> Result<()> {
    let (namespace, _operator, ca) = Scenario::start("annotate-off").await?.parts();
    let secret_id = format!("{namespace}/client");
    put_source(&secret_id, &good_secret(&ca)?).await?;
    let spec = serde_json::json!({"restart": {"policy": "Annotate"}});
    create_identity(&namespace, &identity("client", &secret_id, spec)?).await?;
    wait_ready(&namespace, "client", "True", "Synced").await?;
    create_deployment(&namespace, "app", Some(("volume", "client"))).await?;
    wait_all_rolled_out(&namespace).await?;
    let version = put_source(&secret_id, &good_secret(&ca)?).await?;
    wait_event(&namespace, "client", "AnnotateDisabled").await?;
    let identities: Api<MtlsIdentity> = Api::namespaced(support::admin_client().await?, &namespace);
    let status = identities.get("client").await?.status.unwrap_or_default();
    ensure!(
        status.source.map(|s| s.version_id) == Some(version),
        "the Secret still rotates"
    );
    let annotations = pod_annotations(&namespace).await?;
    ensure!(
        annotations
            .values()
            .all(|a| !a.contains_key("mtls-operator.io/cert.client")),
        "{annotations:?}"
    );
    Ok(())
}

/// Cross-account sources: the operator assumes a role only for the namespaces the cluster admin
/// granted it to (`--allowed-role` with `{namespace}`), checked before any call, STS's included.
/// A granted role reads the secret from the role's account, with one AssumeRole shared by the
/// identities that use the role; another namespace naming that role gets `SourceNotAllowed` and
/// costs no STS call; a role whose trust policy refuses the operator is `AccessDenied`, named.
#[tokio::test]
async fn roles_are_assumed_only_for_the_namespaces_granted_them() -> Result<()> {
    const CENTRAL: &str = "111111111111";
    let tenant = support::create_namespace("xacct", &[]).await?;
    let intruder = support::create_namespace("xacct-intruder", &[]).await?;
    let ca = TestCa::new("central CA")?;
    let secret_id = format!("{tenant}/api-client");
    let central_arn =
        create_source_in_account(CENTRAL, "security-admin", &secret_id, &good_secret(&ca)?).await?;
    ensure!(
        central_arn.contains(&format!(":{CENTRAL}:")),
        "{central_arn}"
    );

    let endpoint = counting_endpoint(Mode::Pass).await?;
    let settings = Settings {
        policy: mtls_operator::source::policy::SourcePolicy::new(Vec::new(), None, Vec::new())
            .with_allowed_roles(vec![
                format!("arn:aws:iam::{CENTRAL}:role/mtls/{{namespace}}"),
                // Fenced by `/` (`{namespace}-*` is refused: it would match other namespaces').
                format!("arn:aws:iam::{CENTRAL}:role/mtls/{{namespace}}/*"),
            ]),
        ..Settings::default()
    };
    let _operator = start_operator_through(&endpoint, &[&tenant, &intruder], settings).await?;
    let role = format!("arn:aws:iam::{CENTRAL}:role/mtls/{tenant}");
    let through = |role: &str| {
        serde_json::json!({"source": {
            "secretId": secret_id,
            "roleArn": role,
            "externalId": "tenant-external-id",
        }})
    };

    // Granted: two identities read the central secret through the role, assumed once.
    for name in ["granted", "granted-too"] {
        create_identity(&tenant, &identity(name, &secret_id, through(&role))?).await?;
    }
    for name in ["granted", "granted-too"] {
        let synced = wait_ready(&tenant, name, "True", "Synced").await?;
        let arn = synced.status.and_then(|s| s.source).map(|s| s.arn);
        ensure!(arn.as_deref() == Some(central_arn.as_str()), "{arn:?}");
        let secret = get_secret(&tenant, name).await?.context("synced Secret")?;
        ensure!(
            secret_data(&secret, "tls.crt").is_some_and(|pem| pem.contains("BEGIN CERTIFICATE")),
            "tls.crt"
        );
    }
    ensure!(
        endpoint.sts_count("AssumeRole") == 1,
        "one AssumeRole for the role, shared: {}",
        endpoint.sts_count("AssumeRole")
    );
    // The control: without the role the same name is looked up in the operator's own account.
    create_identity(
        &tenant,
        &identity("own-account", &secret_id, serde_json::json!({}))?,
    )
    .await?;
    wait_ready(&tenant, "own-account", "False", "SourceNotFound").await?;

    // Not granted: another namespace names the tenant's role. Refused before any call.
    create_identity(
        &intruder,
        &identity("borrowed", &secret_id, through(&role))?,
    )
    .await?;
    let refused = wait_ready(&intruder, "borrowed", "False", "SourceNotAllowed").await?;
    let message = &refused.ready_condition().context("Ready")?.message;
    ensure!(
        message.contains(&role) && !message.contains("{namespace}"),
        "{message}"
    );
    wait_event(&intruder, "borrowed", "SourceNotAllowed").await?;
    assert_no_secret(&intruder, "borrowed").await?;
    // Its own prefix does not help either: the role is the tenant's, whatever the secret.
    create_identity(
        &intruder,
        &identity(
            "borrowed-own-name",
            &format!("{intruder}/api-client"),
            through(&role),
        )?,
    )
    .await?;
    wait_ready(&intruder, "borrowed-own-name", "False", "SourceNotAllowed").await?;
    ensure!(
        endpoint.sts_count("AssumeRole") == 1,
        "no STS call for a role the namespace was not granted"
    );

    // Denied by the role's trust policy: AccessDenied, naming the role, nothing written.
    endpoint.deny("AssumeRole");
    let untrusted = format!("arn:aws:iam::{CENTRAL}:role/mtls/{tenant}/untrusted");
    create_identity(
        &tenant,
        &identity("untrusted", &secret_id, through(&untrusted))?,
    )
    .await?;
    let denied = wait_ready(&tenant, "untrusted", "False", "AccessDenied").await?;
    let message = &denied.ready_condition().context("Ready")?.message;
    ensure!(
        message.contains(&untrusted) && message.contains("trust policy"),
        "{message}"
    );
    ensure!(
        !message.contains("is not authorized"),
        "AWS's words stay in the log: {message}"
    );
    wait_event(&tenant, "untrusted", "AccessDenied").await?;
    assert_no_secret(&tenant, "untrusted").await?;
    // The granted identities keep their role's cached credentials: still Ready.
    wait_ready(&tenant, "granted", "True", "Synced").await?;
    Ok(())
}

/// The second wall (#25): with `--tenant-role-arn`, every call for namespace N goes through a
/// session of the tenant role tagged `kubernetes-namespace=N`, and the endpoint holds each call to
/// the shipped IAM policies as AWS would (`examples/tenant-role.permissions.json` for the sessions,
/// `examples/tenant-sessions.operator-policy.json` for the operator's own credentials, which read
/// nothing). The attack: the operator's own policy is made to let any namespace name any secret
/// (the bug the second wall is for), and one namespace asks for another's secret. IAM refuses it:
/// `AccessDenied`, no Secret, and the victim's value never answered to the attacker's session.
#[tokio::test]
async fn each_namespace_reads_through_its_own_tagged_session_and_iam_holds_it_there() -> Result<()>
{
    const TENANT_ROLE: &str = "arn:aws:iam::123456789012:role/mtls-tenant-reader";
    let victim = support::create_namespace("tagged", &[]).await?;
    let attacker = support::create_namespace("tagged-attacker", &[]).await?;
    let ca = TestCa::new("tagged CA")?;
    for source in [
        format!("{victim}/one"),
        format!("{victim}/two"),
        format!("{attacker}/own"),
    ] {
        put_source(&source, &good_secret(&ca)?).await?;
    }
    let endpoint = counting_endpoint(Mode::Pass).await?;
    let policy = |path: &str| -> Result<common::iam::Policy> {
        common::iam::Policy::parse(&std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(path),
        )?)
    };
    endpoint.enforce(common::endpoint::Iam {
        sessions: policy("examples/tenant-role.permissions.json")?,
        own: policy("examples/tenant-sessions.operator-policy.json")?,
    });
    let settings = Settings {
        // The first wall broken on purpose: any namespace may name any secret of the account.
        policy: mtls_operator::source::policy::SourcePolicy::new(
            vec!["*".into()],
            None,
            Vec::new(),
        )
        .with_tenant_role(Some(TENANT_ROLE.into())),
        ..Settings::default()
    };
    let aws = endpoint.aws_config(&support::aws_config().await);
    let source = mtls_operator::source::SecretsManagerSource::new(aws.clone())
        .with_cluster_name(Some("test-cluster".into()));
    let _operator = start_operator_on(&[&victim, &attacker], settings, aws, source).await?;

    for name in ["one", "two"] {
        create_identity(
            &victim,
            &identity(name, &format!("{victim}/{name}"), serde_json::json!({}))?,
        )
        .await?;
    }
    create_identity(
        &attacker,
        &identity("own", &format!("{attacker}/own"), serde_json::json!({}))?,
    )
    .await?;
    for (namespace, name) in [(&victim, "one"), (&victim, "two"), (&attacker, "own")] {
        wait_ready(namespace, name, "True", "Synced").await?;
    }
    // The attack: the attacker's identity names the victim's secret, by name and by ARN.
    let victim_arn = arn_of(&format!("{victim}/one")).await?;
    for (name, id) in [
        ("steal", format!("{victim}/one")),
        ("steal-arn", victim_arn.clone()),
    ] {
        create_identity(&attacker, &identity(name, &id, serde_json::json!({}))?).await?;
    }
    for name in ["steal", "steal-arn"] {
        let refused = wait_ready(&attacker, name, "False", "AccessDenied").await?;
        let message = &refused.ready_condition().context("Ready")?.message;
        ensure!(!message.contains("BEGIN"), "{message}");
        assert_no_secret(&attacker, name).await?;
    }

    // One session per namespace, tagged with it and the cluster, named after it.
    let sessions = endpoint.sessions();
    let session_of = |namespace: &str| {
        sessions
            .iter()
            .filter(|s| s.tags.get("kubernetes-namespace").map(String::as_str) == Some(namespace))
            .collect::<Vec<_>>()
    };
    for namespace in [&victim, &attacker] {
        let own = session_of(namespace);
        ensure!(
            own.len() == 1,
            "{} sessions for {namespace}: {sessions:?}",
            own.len()
        );
        let session = own[0];
        ensure!(session.role_arn == TENANT_ROLE, "{session:?}");
        ensure!(
            session.session_name == format!("mtls-{namespace}"),
            "{session:?}"
        );
        ensure!(
            session.tags.get("kubernetes-cluster").map(String::as_str) == Some("test-cluster"),
            "{session:?}"
        );
    }
    ensure!(
        sessions.len() == 2,
        "sessions beyond one per namespace: {sessions:?}"
    );
    // Every Secrets Manager call was made in a namespace's session, and every secret a call that
    // was answered asked for belongs to that session's namespace.
    let namespace_of_key = |key: &str| {
        sessions
            .iter()
            .find(|s| s.access_key == key)
            .and_then(|s| s.tags.get("kubernetes-namespace").cloned())
    };
    let victim_ids = [
        format!("{victim}/one"),
        format!("{victim}/two"),
        victim_arn.clone(),
    ];
    let mut attacker_asked = 0;
    for seen in endpoint.seen() {
        let namespace = namespace_of_key(&seen.access_key)
            .with_context(|| format!("a call outside any namespace's session: {seen:?}"))?;
        let asks_victim = victim_ids.iter().any(|id| seen.body.contains(id.as_str()));
        if namespace == attacker && asks_victim {
            attacker_asked += 1;
            let read = matches!(seen.operation.as_str(), "GetSecretValue" | "DescribeSecret");
            ensure!(
                !(read && seen.forwarded),
                "the attacker's session was answered about the victim's secret: {seen:?}"
            );
        }
        if namespace == victim {
            ensure!(!seen.body.contains(&format!("{attacker}/")), "{seen:?}");
        }
    }
    ensure!(
        attacker_asked >= 1,
        "the attack never reached IAM: the test proves nothing"
    );
    // The victim is unharmed.
    for name in ["one", "two"] {
        wait_ready(&victim, name, "True", "Synced").await?;
    }
    Ok(())
}

/// Cross-account roles get the namespace's session tags too (#25 item 1): with `--tenant-role-arn`,
/// a role that two namespaces are both granted is assumed once per namespace, each session tagged
/// `kubernetes-namespace=N` and named after N (so the role's account can scope it with
/// `${aws:PrincipalTag/kubernetes-namespace}`), and each namespace's calls to the role's account go
/// through its own session, never the other's.
#[tokio::test]
async fn cross_account_roles_are_assumed_in_one_tagged_session_per_namespace() -> Result<()> {
    const CENTRAL: &str = "111111111111";
    const TENANT_ROLE: &str = "arn:aws:iam::123456789012:role/mtls-tenant-reader";
    let first = support::create_namespace("xtag", &[]).await?;
    let second = support::create_namespace("xtag-other", &[]).await?;
    let ca = TestCa::new("central tagged CA")?;
    for namespace in [&first, &second] {
        create_source_in_account(
            CENTRAL,
            "security-admin",
            &format!("{namespace}/api-client"),
            &good_secret(&ca)?,
        )
        .await?;
    }
    let shared = format!("arn:aws:iam::{CENTRAL}:role/mtls/shared-reader");
    let endpoint = counting_endpoint(Mode::Pass).await?;
    let settings = Settings {
        policy: mtls_operator::source::policy::SourcePolicy::new(Vec::new(), None, Vec::new())
            .with_allowed_roles(vec![shared.clone()])
            .with_tenant_role(Some(TENANT_ROLE.into())),
        ..Settings::default()
    };
    let _operator = start_operator_through(&endpoint, &[&first, &second], settings).await?;
    for namespace in [&first, &second] {
        for name in ["central", "central-too"] {
            let spec = serde_json::json!({"source": {
                "secretId": format!("{namespace}/api-client"),
                "roleArn": shared,
                "externalId": "tenant-external-id",
            }});
            create_identity(
                namespace,
                &identity(name, &format!("{namespace}/api-client"), spec)?,
            )
            .await?;
        }
    }
    for namespace in [&first, &second] {
        for name in ["central", "central-too"] {
            let synced = wait_ready(namespace, name, "True", "Synced").await?;
            let arn = synced.status.and_then(|s| s.source).map(|s| s.arn);
            ensure!(
                arn.as_deref()
                    .is_some_and(|arn| arn.contains(&format!(":{CENTRAL}:"))),
                "read from the role's account: {arn:?}"
            );
        }
    }
    let sessions = endpoint.sessions();
    let of_shared: Vec<_> = sessions.iter().filter(|s| s.role_arn == shared).collect();
    ensure!(
        of_shared.len() == 2,
        "one session of the shared role per namespace: {sessions:?}"
    );
    for namespace in [&first, &second] {
        let own: Vec<_> = of_shared
            .iter()
            .filter(|s| s.tags.get("kubernetes-namespace") == Some(namespace))
            .collect();
        ensure!(own.len() == 1, "{namespace}: {sessions:?}");
        ensure!(
            own[0].session_name == format!("mtls-{namespace}"),
            "{sessions:?}"
        );
    }
    // Every call to the role's account is in one namespace's session and asks only for its own
    // namespace's secret; each namespace's session made some.
    let mut calls = std::collections::BTreeMap::<String, usize>::new();
    for seen in endpoint
        .seen()
        .iter()
        .filter(|s| s.service == "secretsmanager")
    {
        let Some(session) = of_shared.iter().find(|s| s.access_key == seen.access_key) else {
            continue;
        };
        let namespace = session.tags.get("kubernetes-namespace").context("tagged")?;
        let other = if namespace == &first { &second } else { &first };
        ensure!(
            !seen.body.contains(&format!("{other}/")),
            "{namespace}'s session asked for {other}'s secret: {seen:?}"
        );
        *calls.entry(namespace.clone()).or_default() += 1;
    }
    ensure!(
        calls.len() == 2,
        "each namespace read through its own session: {calls:?}"
    );
    Ok(())
}

/// An admin's pattern that would let one namespace match another's names (`{namespace}-*`: the
/// pattern of `team-a` matches `team-a-b-client`, which is `team-a-b`'s) is refused at start, with
/// the reason (#25); a fenced pattern gets past the check (and here fails later, on the missing
/// kubeconfig).
#[test]
fn patterns_that_let_a_namespace_match_anothers_names_are_refused_at_start() -> Result<()> {
    let start = |flag: &str| -> Result<(bool, String)> {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_mtls-operator"))
            .args(["run", flag])
            .args([
                "--health-address=127.0.0.1:0",
                "--metrics-address=127.0.0.1:0",
            ])
            .env("KUBECONFIG", "/nonexistent/kubeconfig")
            .env_remove("KUBERNETES_SERVICE_HOST")
            .output()?;
        Ok((
            output.status.success(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        ))
    };
    for flag in [
        "--allowed-source={namespace}-*",
        "--allowed-role=arn:aws:iam::111111111111:role/mtls/{namespace}-*",
    ] {
        let (started, stderr) = start(flag)?;
        ensure!(!started, "{flag}: started");
        ensure!(
            stderr.contains("{namespace}-*") && stderr.contains("team-a-b"),
            "{flag}: {stderr}"
        );
    }
    let (started, stderr) = start("--allowed-source={namespace}/*")?;
    ensure!(!started && !stderr.contains("team-a-b"), "{stderr}");
    Ok(())
}
