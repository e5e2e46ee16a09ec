//! One identity's sync: check the source ids, look at the target Secret, decide whether a value must
//! be read at all (the fleet's version index says whether anything changed), read it, check the
//! canonical ARN again, validate, and write the Secret without ever taking over a foreign one.

use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use kube::api::Api;
use kube::{Resource, ResourceExt};

use crate::api::{MtlsIdentity, SourceFormat};
use crate::pki;
use crate::pki::keystore::Pkcs12Profile;
use crate::source::FetchedSecret;

use super::context::{Context, Now, Parsed};
use super::decide::{self, CheckedSecret, SyncFailure, Synced};
use super::error::ReconcileError;
use super::offload;
use super::secret;
use super::write::{self, Conflict};

/// What a sync did.
pub enum SyncStep {
    /// Read and written (or refused, with the reason the user must see).
    Done(Box<Result<Synced, SyncFailure>>),
    /// Nothing changed: no value was read, the Secret and status stand. Carries the facts of the
    /// last successful sync as status records them (`None`: the identity is failing on a version
    /// already refused).
    Unchanged(Option<Box<Synced>>),
    /// A read is needed, but the identity's read budget is spent: look again then.
    Wait(Duration),
}

impl SyncStep {
    fn done(outcome: Result<Synced, SyncFailure>) -> Self {
        Self::Done(Box::new(outcome))
    }
}

/// Everything up to and including the Secret write. `Err(..)`: the Kubernetes API failed and the
/// reconcile is retried. `refresh`: a refresh request is honoured: the versions are checked now,
/// whatever the index says, and a failing identity is read again even on a version it refused.
pub async fn sync(
    identity: &MtlsIdentity,
    parsed: &Parsed,
    now: &Now,
    refresh: bool,
    context: &Context,
) -> Result<SyncStep, ReconcileError> {
    let secrets: Api<Secret> = Api::namespaced(context.client.clone(), &parsed.namespace);
    let (main, ca) = match checked_sources(identity, parsed, context) {
        Ok(checked) => checked,
        Err(failure) => return Ok(SyncStep::done(Err(failure))),
    };
    // An identity never reconciled (no status) has, all but always, no Secret yet: the create
    // finds out, one API request fewer per new identity. The rare exception (a Secret written by
    // a sync whose status the operator could not write before it stopped, or a foreign one) makes
    // the create fail, and the write looks then (see `write_secret`).
    let looked_at_target = identity.status.is_some();
    let existing = if looked_at_target {
        match target_secret(&secrets, parsed).await? {
            Ok(existing) => existing,
            Err(conflict) => return Ok(SyncStep::done(Err(conflict))),
        }
    } else {
        None
    };
    let looked = gather(
        identity,
        parsed,
        now,
        context,
        &secrets,
        existing.as_ref(),
        &main,
        ca.as_ref(),
        refresh,
    )
    .await?;
    let Looked {
        gathered,
        carried_facts,
        keystore_password,
    } = looked;
    match decide::read_step(&gathered) {
        decide::Step::Read => {}
        decide::Step::Unchanged => return Ok(SyncStep::Unchanged(carried_facts.map(Box::new))),
        decide::Step::Refuse(refusal) => {
            let failure = match refusal {
                decide::Refusal::Gone(secret_id) => {
                    SyncFailure::Source(crate::source::SourceError::NotFound {
                        secret_id,
                        detail: "DescribeSecret: deleted or scheduled for deletion".into(),
                    })
                }
                decide::Refusal::PasswordMissing => match keystore_password {
                    Some(Err(failure)) => failure,
                    _ => SyncFailure::InvalidSpec("the keystore password is missing".into()),
                },
            };
            return Ok(SyncStep::done(Err(failure)));
        }
    }
    let refresh = parsed.refresh_or_default();
    let (namespace, key, source) = (
        parsed.namespace.as_str(),
        &parsed.key,
        &identity.spec.source,
    );
    // Edits of the Secret or the identity trigger reconciles; they must not set the AWS call rate.
    if let Some(wait) = context.memory.take_fetch(key, refresh, now.instant) {
        return Ok(SyncStep::Wait(wait));
    }

    // A Pkcs12 source's password, read before the value (a missing one is reported without it).
    let source_password = match (&source.format, &source.password_secret_ref) {
        (SourceFormat::Pkcs12, Some(reference)) => {
            match read_password(&secrets, namespace, reference).await? {
                Ok(password) => Some(password),
                Err(failure) => return Ok(SyncStep::done(Err(failure))),
            }
        }
        // Without a reference, the password is a field of the JSON the source holds.
        _ => None,
    };
    let (fetched, ca_version, ca_text) =
        match fetch_sources(identity, namespace, &main, ca.as_ref(), context).await {
            Ok(fetched) => fetched,
            Err(failure) => return Ok(SyncStep::done(Err(failure))),
        };
    // Parsing and validation on the certificate-work pool, never on an async worker.
    let work = parse_and_validate(identity, &fetched, ca_text, source_password, now.unix);
    let validated = match offload::cpu(work).await {
        Err(unfinished) => return Ok(come_back_unfinished(key, &unfinished)),
        Ok(Err(error)) => {
            return Ok(SyncStep::done(Err(SyncFailure::Material {
                context: format!("version {} of {}", fetched.version_id, source.secret_id),
                error,
            })));
        }
        Ok(Ok(Ok(validated))) => validated,
        Ok(Ok(Err(error))) => {
            // Not read again until a new version arrives (or the refresh interval passes).
            context.memory.update(key, |memory| {
                memory.known_bad = Some(fetched.version_id.as_str().into())
            });
            return Ok(SyncStep::done(Err(SyncFailure::Material {
                context: format!("version {} of {}", fetched.version_id, source.secret_id),
                error,
            })));
        }
    };
    context.memory.update(key, |memory| memory.known_bad = None);

    write_secret(
        identity,
        parsed,
        &secrets,
        existing.as_ref(),
        looked_at_target,
        fetched,
        ca_version,
        &validated,
        keystore_password,
        context,
    )
    .await
}

/// The source ids, checked before any AWS call (strict parsing, the policy) and registered in the
/// index (only secrets the policy allowed enter it), and the refresh interval.
fn checked_sources(
    identity: &MtlsIdentity,
    parsed: &Parsed,
    context: &Context,
) -> Result<(CheckedSecret, Option<CheckedSecret>), SyncFailure> {
    let identity_key = (parsed.namespace.clone(), parsed.name.clone());
    let checked = decide::check_source(
        &identity.spec.source,
        &parsed.namespace,
        &context.settings.policy,
        context.settings.default_region.as_deref(),
    );
    let (main, ca) = match checked {
        Ok(checked) => checked,
        Err(failure) => {
            context.fleet.unregister(&identity_key);
            return Err(failure);
        }
    };
    let Some(refresh) = parsed.refresh else {
        return Err(SyncFailure::InvalidSpec(format!(
            "refreshInterval {:?} is not a duration such as 1h or 30s",
            identity.spec.refresh_interval
        )));
    };
    let requests: Vec<_> = std::iter::once(&main)
        .chain(ca.as_ref())
        .map(|checked| checked.request.clone())
        .collect();
    // Not for an identity deleted while this reconcile ran (see `Memory::if_present`).
    context.memory.if_present(&parsed.key, || {
        context.fleet.register(&identity_key, &requests, refresh)
    });
    Ok((main, ca))
}

/// The target Secret, read whole if it is ours (to see whether it is intact and what it was written
/// from), `None` if absent; `TargetConflict` if a foreign one holds the name. Metadata first: a
/// Secret we do not own is never read, only refused.
async fn target_secret(
    secrets: &Api<Secret>,
    parsed: &Parsed,
) -> Result<Result<Option<Secret>, SyncFailure>, ReconcileError> {
    let (namespace, target, owner_uid) = (&parsed.namespace, &parsed.target, parsed.uid.as_str());
    let conflict = || SyncFailure::TargetConflict {
        secret: format!("{namespace}/{target}"),
    };
    let seen = write::metadata(secrets, target).await?;
    if let Some(seen) = &seen
        && !secret::is_owned_by(&seen.metadata, owner_uid)
    {
        return Ok(Err(conflict()));
    }
    let existing = match &seen {
        Some(_) => secrets.get_opt(target).await?,
        None => None,
    };
    // Replaced by a foreign Secret since the metadata check: refuse it, as above.
    if let Some(existing) = &existing
        && !secret::is_owned_by(&existing.metadata, owner_uid)
    {
        return Ok(Err(conflict()));
    }
    Ok(Ok(existing))
}

/// A keystore or PKCS#12 source password: overwritten when dropped.
type Password = zeroize::Zeroizing<String>;

/// What the read chain decides on, and what the rest of the sync reuses.
struct Looked {
    gathered: decide::Gathered,
    /// The facts of the last successful sync, when the Secret still holds them.
    carried_facts: Option<Synced>,
    /// The keystore password, read once (`None`: no keystore asked for).
    keystore_password: Option<Result<Password, SyncFailure>>,
}

/// Gathers what decides whether a value is read: the versions the Secret carries against the
/// index's view, the keystore against its password, a source deleted in Secrets Manager.
#[allow(clippy::too_many_arguments)]
async fn gather(
    identity: &MtlsIdentity,
    parsed: &Parsed,
    now: &Now,
    context: &Context,
    secrets: &Api<Secret>,
    existing: Option<&Secret>,
    main: &CheckedSecret,
    ca: Option<&CheckedSecret>,
    refresh_now: bool,
) -> Result<Looked, ReconcileError> {
    let (namespace, target, key) = (
        parsed.namespace.as_str(),
        parsed.target.as_str(),
        &parsed.key,
    );
    let refresh = parsed.refresh_or_default();
    // Is a read needed? Not if the Secret is intact, the spec unchanged, and the index expects the
    // versions the Secret carries.
    let now_unix = now.unix;
    let carried_facts = decide::synced_from_status(
        identity.status.as_ref(),
        identity.metadata.generation,
        target,
        now_unix,
    );
    let carried = existing
        .and_then(|existing| secret::carried_versions(&context.settings.integrity_key, existing))
        .filter(|(version, _)| {
            carried_facts
                .as_ref()
                .is_some_and(|synced| synced.version_id == *version)
        });
    let failed_spec_current = identity
        .status
        .as_ref()
        .is_some_and(|status| status.observed_generation == identity.metadata.generation);
    let known_bad = context.memory.read(key, |memory| memory.known_bad.clone());
    // A refresh asks again even about a version refused before (a fixed CA, a fixed clock).
    let known_bad = known_bad.filter(|_| failed_spec_current && !refresh_now);
    // After an operator restart the index is empty: the versions an intact Secret carries are taken
    // as current until the first sweep (an explicit write; the view below only reads).
    if let Some((main_version, ca_version)) = &carried {
        context.fleet.seed(&main.request, main_version, now.instant);
        if let (Some(ca), Some(ca_version)) = (&ca, ca_version) {
            context.fleet.seed(&ca.request, ca_version, now.instant);
        }
    }
    // A refresh checks the versions the Secret carries now (a failing identity is read anyway);
    // in `get` mode, with no version checks, it reads.
    let mut refresh_reads = false;
    if refresh_now && carried.is_some() {
        match context.fleet.mode() {
            crate::source::fleet::SweepMode::Get => refresh_reads = true,
            _ => {
                context.fleet.check(&main.request).await;
                if let Some(ca) = ca {
                    context.fleet.check(&ca.request).await;
                }
            }
        }
    }
    // The index's view of each source, taken once: whether it changed, whether it is gone.
    let main_view = context.fleet.view(&main.request, now.instant);
    let ca_view = ca.map(|ca| (ca, context.fleet.view(&ca.request, now.instant)));
    let stale = |view: &crate::source::fleet::IndexView, carried: Option<&str>| {
        crate::source::fleet::needs_read(&crate::source::fleet::Freshness {
            mode: context.fleet.mode(),
            carried,
            expected: view.expected.as_deref(),
            known_bad: known_bad.as_deref(),
            age: view.age,
            checks_failing: view.checks_failing,
            refresh,
        })
    };
    // The keystore's password, read once: the check below and the rendering use the same value.
    let keystore_password = match identity.pkcs12() {
        Some(spec) => Some(read_password(secrets, namespace, &spec.password_secret_ref).await?),
        None => None,
    };
    let gone = std::iter::once((main, &main_view))
        .chain(ca_view.as_ref().map(|(ca, view)| (*ca, view)))
        .find(|(_, view)| view.gone)
        .map(|(checked, _)| checked.request.secret_id.clone());
    let gathered = decide::Gathered {
        gone,
        version_changed: refresh_reads
            || stale(&main_view, carried.as_ref().map(|(main, _)| main.as_str()))
            || ca_view.as_ref().is_some_and(|(_, view)| {
                stale(view, carried.as_ref().and_then(|(_, ca)| ca.as_deref()))
            }),
        keystore: match (&keystore_password, carried_keystore(existing, &carried)) {
            (None, _) => decide::Keystore::None,
            (Some(Err(_)), carried) => decide::Keystore::PasswordMissing {
                carried: carried.is_some(),
            },
            (Some(Ok(_)), None) => decide::Keystore::ToRender,
            // From the tags of the intact Secret alone: no KDF ever runs on `keystore.p12`,
            // which the tenant can write.
            (Some(Ok(password)), Some(existing)) => {
                if secret::keystore_password_unchanged(
                    &context.settings.integrity_key,
                    existing,
                    &parsed.uid,
                    password,
                ) {
                    decide::Keystore::SamePassword
                } else {
                    decide::Keystore::PasswordChanged
                }
            }
        },
    };
    Ok(Looked {
        gathered,
        carried_facts,
        keystore_password,
    })
}

/// Renders the Secret (and keystores) from the validated material and writes it, never over a
/// foreign one.
#[allow(clippy::too_many_arguments)]
async fn write_secret(
    identity: &MtlsIdentity,
    parsed: &Parsed,
    secrets: &Api<Secret>,
    existing: Option<&Secret>,
    looked_at_target: bool,
    fetched: FetchedSecret,
    ca_version: Option<String>,
    validated: &pki::ValidatedIdentity,
    keystore_password: Option<Result<Password, SyncFailure>>,
    context: &Context,
) -> Result<SyncStep, ReconcileError> {
    let (namespace, target, owner_uid) = (
        parsed.namespace.as_str(),
        parsed.target.as_str(),
        parsed.uid.as_str(),
    );
    let Some(owner) = identity.controller_owner_ref(&()) else {
        return Ok(SyncStep::done(Err(SyncFailure::InvalidSpec(
            "the MtlsIdentity has no uid yet".to_string(),
        ))));
    };
    let pkcs12 = match identity.pkcs12() {
        None => None,
        Some(spec) => {
            let password = match keystore_password {
                Some(Ok(password)) => password,
                Some(Err(failure)) => return Ok(SyncStep::done(Err(failure))),
                // Read above whenever keystores are asked for.
                None => {
                    return Ok(SyncStep::done(Err(SyncFailure::InvalidSpec(
                        "the keystore password was not read".into(),
                    ))));
                }
            };
            let alias = spec.alias.clone().unwrap_or_else(|| identity.name_any());
            let profile = match spec.profile {
                crate::api::Pkcs12Profile::Modern => Pkcs12Profile::Modern,
                crate::api::Pkcs12Profile::Legacy => Pkcs12Profile::Legacy,
            };
            let key = &context.settings.integrity_key;
            let inputs = secret::keystore_inputs(key, validated, &password, &alias, profile);
            let files = match secret::reusable_pkcs12(key, existing, &inputs) {
                Some(files) => files,
                // Rendering runs a KDF (on the operator's own inputs): on the pool too.
                None => {
                    let render = {
                        let (validated, password, alias) =
                            (validated.clone(), password.clone(), alias.clone());
                        move || pki::keystore::pkcs12(&validated, &password, &alias, profile)
                    };
                    match offload::cpu(render).await {
                        Ok(Ok(files)) => files,
                        Ok(Err(error)) => return Ok(SyncStep::done(Err(error.into()))),
                        Err(unfinished) => {
                            return Ok(come_back_unfinished(&parsed.key, &unfinished));
                        }
                    }
                }
            };
            Some(secret::RenderedPkcs12 {
                files,
                inputs,
                password: secret::keystore_password_tag(key, owner_uid, &password),
            })
        }
    };
    let formats = identity.output_formats();
    let desired = secret::desired_secret(
        &context.settings.integrity_key,
        target,
        namespace,
        &identity.name_any(),
        owner,
        secret::SourceVersions {
            main: &fetched.version_id,
            ca: ca_version.as_deref(),
        },
        validated,
        secret::Outputs {
            formats: &formats,
            pkcs12: pkcs12.as_ref(),
        },
    );
    let up_to_date = existing
        .as_ref()
        .is_some_and(|existing| secret::secret_up_to_date(existing, &desired));
    if !up_to_date {
        let writing = context.memory.secret_write(&parsed.key);
        let written = match &existing {
            // Absent when we looked: create, so one created meanwhile is never overwritten.
            None => match write::create_returning(secrets, &desired).await? {
                Ok(created) => created,
                // Not looked at before the read (a new identity), and there after all: ours (written
                // by a sync whose status was never written) is brought up to date now, in this
                // reconcile, so a status that stays empty cannot make this loop; a foreign one is a
                // conflict, its content never read.
                Err(Conflict) if !looked_at_target => match target_secret(secrets, parsed).await? {
                    Err(conflict) => return Ok(SyncStep::done(Err(conflict))),
                    Ok(None) => return Ok(SyncStep::Wait(Duration::from_secs(1))),
                    Ok(Some(ours)) if secret::secret_up_to_date(&ours, &desired) => ours.metadata,
                    Ok(Some(ours)) => write::replace_owned_secret(secrets, &ours, desired).await?,
                },
                Err(Conflict) => {
                    // Created meanwhile. By us (another replica during a leader change, or a
                    // reconcile that raced): look again shortly. By someone else: a conflict.
                    let now_there = write::metadata(secrets, target).await?;
                    if now_there.is_some_and(|meta| secret::is_owned_by(&meta.metadata, owner_uid))
                    {
                        return Ok(SyncStep::Wait(Duration::from_secs(1)));
                    }
                    return Ok(SyncStep::done(Err(SyncFailure::TargetConflict {
                        secret: format!("{namespace}/{target}"),
                    })));
                }
            },
            // Ours (checked above): replaced with its resourceVersion as the precondition.
            Some(existing) => write::replace_owned_secret(secrets, existing, desired).await?,
        };
        // Its watch event is this write: it must not reconcile the identity again (see runner).
        writing.made(written.resource_version.as_deref());
    }
    let keystore_changed = pkcs12
        .as_ref()
        .and_then(|rendered| secret::keystore_changed_alone(existing, validated, &rendered.inputs));
    Ok(SyncStep::done(Ok(Synced {
        arn: fetched.arn,
        version_id: fetched.version_id,
        certificate: decide::certificate_status(validated),
        not_after_unix: validated.facts.not_after,
        secret_name: target.to_string(),
        keystore_changed,
    })))
}

/// Fetches a checked secret and checks the policy again on the canonical ARN and name Secrets
/// Manager returned; a refused value is dropped here, before it is parsed or written. What was read
/// is recorded in the fleet's index.
async fn fetch_checked(
    checked: &CheckedSecret,
    namespace: &str,
    context: &Context,
) -> Result<FetchedSecret, SyncFailure> {
    let fetched = context.source.fetch(&checked.request, namespace).await?;
    decide::check_resolved(
        checked,
        namespace,
        &context.settings.policy,
        &fetched.arn,
        &fetched.name,
    )?;
    context.fleet.record_read(
        &checked.request,
        &fetched.version_id,
        &fetched.arn,
        &fetched.name,
    );
    Ok(fetched)
}

/// How soon a sync whose certificate work did not finish (see `offload`) is tried again.
const UNFINISHED_RETRY: Duration = Duration::from_secs(5);

/// A sync whose certificate work (parsing, validation, rendering) did not finish: said in the log,
/// tried again shortly; the Secret and status stand.
fn come_back_unfinished(
    key: &kube::runtime::reflector::ObjectRef<MtlsIdentity>,
    unfinished: &offload::Unfinished,
) -> SyncStep {
    tracing::warn!(identity = %key, error = %unfinished, "certificate work unfinished; trying again");
    SyncStep::Wait(UNFINISHED_RETRY)
}

/// Fetches the source and the separate CA secret, if any: the main secret as read, the CA
/// secret's version and text.
async fn fetch_sources(
    identity: &MtlsIdentity,
    namespace: &str,
    main: &CheckedSecret,
    ca: Option<&CheckedSecret>,
    context: &Context,
) -> Result<(FetchedSecret, Option<String>, Option<String>), SyncFailure> {
    let source = &identity.spec.source;
    let fetched = fetch_checked(main, namespace, context).await?;
    match ca {
        Some(ca) if source.format == SourceFormat::Pem => {
            let ca_fetched = fetch_checked(ca, namespace, context).await?;
            let text = ca_fetched
                .content
                .stored()
                .text()
                .map(str::to_string)
                .map_err(|error| SyncFailure::Material {
                    context: format!(
                        "version {} of {}",
                        ca_fetched.version_id, ca.request.secret_id
                    ),
                    error,
                })?;
            Ok((fetched, Some(ca_fetched.version_id), Some(text)))
        }
        _ => Ok((fetched, None, None)),
    }
}

/// The CPU part of a read, as work for the pool: the value parsed into material
/// (`Err`: unreadable), then validated at `now_unix` (`Ok(Err)`: refused).
#[allow(clippy::type_complexity)]
fn parse_and_validate(
    identity: &MtlsIdentity,
    fetched: &FetchedSecret,
    ca_text: Option<String>,
    source_password: Option<Password>,
    now_unix: i64,
) -> impl FnOnce() -> Result<Result<pki::ValidatedIdentity, pki::PkiError>, pki::PkiError> + Send + 'static
{
    let source = &identity.spec.source;
    let format = source.format;
    let fields = source.fields.clone().unwrap_or_default();
    let fields = pki::JsonFields {
        certificate: fields.certificate,
        private_key: fields.private_key,
        ca: fields.ca,
    };
    let content = fetched.content.clone();
    move || {
        let format = match format {
            SourceFormat::Json => pki::StoredFormat::Json(&fields),
            SourceFormat::Pem => pki::StoredFormat::Pem {
                ca: ca_text.as_deref(),
            },
            SourceFormat::Pkcs12 => pki::StoredFormat::Pkcs12 {
                password: source_password.as_deref().map(String::as_str),
            },
        };
        let material = pki::read_material(content.stored(), format)?;
        Ok(pki::validate(&material, now_unix))
    }
}

/// An intact Secret of ours (one that carries its versions) that holds a keystore.
fn carried_keystore<'a, T>(
    existing: Option<&'a Secret>,
    carried: &Option<T>,
) -> Option<&'a Secret> {
    carried.as_ref()?;
    let existing = existing?;
    existing
        .data
        .as_ref()?
        .contains_key(secret::KEYSTORE_KEY)
        .then_some(existing)
}

/// A password from `reference` in the identity's namespace (a keystore's, or a Pkcs12 source's).
/// `Ok(Err(KeystorePasswordMissing))` when the Secret or the key is absent, empty or not text; a
/// Kubernetes API error is returned as such, so it is retried rather than reported as missing.
/// Never logged.
async fn read_password(
    secrets: &Api<Secret>,
    namespace: &str,
    reference: &crate::api::SecretKeyRef,
) -> Result<Result<Password, SyncFailure>, ReconcileError> {
    let password = secrets
        .get_opt(&reference.name)
        .await?
        .and_then(|secret| secret.data)
        .and_then(|mut data| data.remove(&reference.key))
        .and_then(|value| String::from_utf8(value.0).ok())
        .filter(|password| !password.is_empty())
        .map(zeroize::Zeroizing::new);
    Ok(
        password.ok_or_else(|| SyncFailure::KeystorePasswordMissing {
            secret: format!("{namespace}/{}", reference.name),
            key: reference.key.clone(),
        }),
    )
}
