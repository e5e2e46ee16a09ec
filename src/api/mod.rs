//! The `MtlsIdentity` custom resource: types and schema, nothing else.
//!
//! The CRD YAML in `crds/` is generated from these types (`mtls-operator crd`); a test fails when the
//! committed copy drifts. Cross-field rules are CEL (`x-kubernetes-validations`), so the API server
//! rejects an inconsistent manifest with a readable message before the operator ever sees it.

use kube::{CustomResource, CustomResourceExt, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub mod conditions;
mod stored;
pub use stored::StoredIdentity;

pub const GROUP: &str = "mtls-operator.io";
/// The field manager of every write the operator makes.
pub const FIELD_MANAGER: &str = "mtls-operator";
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
pub const MANAGED_BY_VALUE: &str = "mtls-operator";
pub const IDENTITY_LABEL: &str = "mtls-operator.io/identity";
pub const VERSION_ID_ANNOTATION: &str = "mtls-operator.io/source-version-id";
pub const FINGERPRINT_ANNOTATION: &str = "mtls-operator.io/certificate-sha256";
/// On an MtlsIdentity: set (to any new value, by convention the time) to ask for one version
/// check and, where needed, one read now (`mtls-operator refresh`); at most one request per
/// identity per [`REFRESH_MIN_INTERVAL`] is honoured, later ones wait for it.
pub const REFRESH_ANNOTATION: &str = "mtls-operator.io/refresh-requested-at";
/// The shortest time between two honoured refresh requests of one identity.
pub const REFRESH_MIN_INTERVAL: std::time::Duration = std::time::Duration::from_secs(10);
/// The longest refresh request value status echoes (a tenant writes it): longer ones are cut.
pub const REFRESH_VALUE_MAX: usize = 64;
/// The version of `spec.source.caSecretId` the Secret was written from.
pub const CA_VERSION_ID_ANNOTATION: &str = "mtls-operator.io/ca-source-version-id";
/// The operator's keyed tag (HMAC-SHA256, `pki::integrity`) over the Secret's name, data and the
/// annotations that say what it was made from: any edit of the Secret is seen without reading AWS
/// or opening a keystore, and a tenant cannot compute a matching tag.
pub const INTEGRITY_ANNOTATION: &str = "mtls-operator.io/integrity-hmac-sha256";

/// A workload's client certificate, kept in sync from AWS Secrets Manager into a
/// `kubernetes.io/tls` Secret.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "mtls-operator.io",
    version = "v1alpha1",
    kind = "MtlsIdentity",
    plural = "mtlsidentities",
    shortname = "mtlsid",
    namespaced,
    status = "MtlsIdentityStatus",
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Reason","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].reason"}"#,
    printcolumn = r#"{"name":"Expires","type":"string","jsonPath":".status.certificate.notAfter"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#,
    printcolumn = r#"{"name":"Secret","type":"string","jsonPath":".spec.source.secretId","priority":1}"#,
    printcolumn = r#"{"name":"Version","type":"string","jsonPath":".status.source.versionId","priority":1}"#,
    printcolumn = r#"{"name":"Rotated","type":"date","jsonPath":".status.lastRotation.time","priority":1}"#,
    printcolumn = r#"{"name":"Target","type":"string","jsonPath":".status.secretName","priority":1}"#,
    // The name becomes a label value (63 characters at most) and, with egress, a Service name (a
    // DNS label: no dots): refused here, not in an error loop that reads AWS on every retry.
    validation = kube::core::Rule::new("self.metadata.name.size() <= 63")
        .message("the MtlsIdentity name must be at most 63 characters (it is used as a label value)"),
    validation = kube::core::Rule::new("!has(self.spec.egress) || !self.metadata.name.contains('.')")
        .message("an MtlsIdentity with spec.egress needs a name without dots (it names a Service)")
)]
#[serde(rename_all = "camelCase")]
pub struct MtlsIdentitySpec {
    /// Where the certificate material lives in AWS Secrets Manager.
    pub source: SourceSpec,
    /// The Secret the operator writes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<TargetSpec>,
    /// Safety-net polling period, a Go-style duration (`1h`, `15m`, `30s`); at least 1s.
    #[serde(default = "default_refresh_interval")]
    #[schemars(length(min = 2, max = 32))]
    #[x_kube(validation = kube::core::Rule::new(
        "self.matches('^([0-9]+(ms|s|m|h))+$') && duration(self) >= duration('1s')"
    ).message("refreshInterval must be a duration such as 1h, 15m or 30s, at least 1s"))]
    pub refresh_interval: String,
    /// What happens to the workloads that use the Secret when the certificate rotates.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restart: Option<RestartSpec>,
    /// Expiry warnings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expiry: Option<ExpirySpec>,
    /// An operator-managed egress mTLS proxy: a Deployment and a Service named after the identity
    /// that take plain HTTP and call `upstream` over mutual TLS with this identity's certificate.
    /// Needs the operator's `--enable-egress` (the chart's `egress.enabled`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress: Option<EgressSpec>,
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct EgressSpec {
    /// The one upstream the proxy calls, e.g. `https://api.partner.example` (https only).
    #[x_kube(validation = kube::core::Rule::new("self.startsWith('https://')")
        .message("egress.upstream must be an https:// URL"))]
    #[schemars(length(min = 9, max = 2048))]
    pub upstream: String,
    /// The Service port applications call with plain HTTP.
    #[serde(default = "default_egress_port")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: i32,
    #[serde(default = "default_egress_replicas")]
    #[schemars(range(min = 1, max = 20))]
    pub replicas: i32,
    /// Verify the upstream with the Secret's `ca.crt` instead of the system roots.
    #[serde(default)]
    pub verify_upstream_with_secret_ca: bool,
    /// Who may send requests through the proxy (NetworkPolicy peers). Default: only pods in the
    /// identity's namespace. Needs a CNI that enforces NetworkPolicy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "bounded_peers")]
    pub allow_from: Option<Vec<k8s_openapi::api::networking::v1::NetworkPolicyPeer>>,
}

/// Lists, maps and strings inside `allowFrom` hold at most this many items / characters. Kubernetes'
/// own NetworkPolicyPeer schema bounds none of them; the operator keeps every identity in memory.
const PEER_MAX_ITEMS: u64 = 20;
/// The longest label key (a 253-character prefix, `/`, a 63-character name).
const PEER_MAX_LENGTH: u64 = 317;

/// `allowFrom`'s schema: Kubernetes' NetworkPolicyPeer list, with a bound on every list, map and
/// string in it, so that one identity cannot carry megabytes of selectors into the operator's memory.
fn bounded_peers(generator: &mut schemars::SchemaGenerator) -> schemars::Schema {
    let schema = generator
        .subschema_for::<Option<Vec<k8s_openapi::api::networking::v1::NetworkPolicyPeer>>>();
    let mut value = serde_json::Value::from(schema);
    bound_schema(&mut value);
    schemars::Schema::try_from(value).unwrap_or_default()
}

/// Adds `maxItems`, `maxProperties` and `maxLength` wherever a schema (or any schema inside it)
/// has none.
fn bound_schema(value: &mut serde_json::Value) {
    match value {
        serde_json::Value::Object(object) => {
            let kind = object.get("type").cloned();
            let is = |name: &str| {
                kind.as_ref().is_some_and(|kind| {
                    kind == name
                        || kind
                            .as_array()
                            .is_some_and(|kinds| kinds.iter().any(|k| k == name))
                })
            };
            if is("array") && !object.contains_key("maxItems") {
                object.insert("maxItems".into(), PEER_MAX_ITEMS.into());
            }
            if is("object")
                && object.contains_key("additionalProperties")
                && !object.contains_key("maxProperties")
            {
                object.insert("maxProperties".into(), PEER_MAX_ITEMS.into());
            }
            if is("string") && !object.contains_key("maxLength") && !object.contains_key("enum") {
                object.insert("maxLength".into(), PEER_MAX_LENGTH.into());
            }
            for child in object.values_mut() {
                bound_schema(child);
            }
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(bound_schema),
        _ => {}
    }
}

fn default_egress_port() -> i32 {
    8080
}

fn default_egress_replicas() -> i32 {
    2
}

fn default_refresh_interval() -> String {
    "1h".to_string()
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = kube::core::Rule::new(
    "!(has(self.versionStage) && has(self.versionId))"
).message("set versionStage or versionId, not both"))]
#[x_kube(validation = kube::core::Rule::new(
    "!has(self.caSecretId) || self.format == 'Pem'"
).message("caSecretId is for format Pem; with format Json the CA is the `ca` field"))]
#[x_kube(validation = kube::core::Rule::new(
    "!has(self.fields) || self.format == 'Json'"
).message("fields apply to format Json only"))]
#[x_kube(validation = kube::core::Rule::new(
    "!has(self.passwordSecretRef) || self.format == 'Pkcs12'"
).message("passwordSecretRef is for format Pkcs12 only"))]
#[x_kube(validation = kube::core::Rule::new(
    "!has(self.externalId) || has(self.roleArn)"
).message("externalId is sent with roleArn only"))]
pub struct SourceSpec {
    /// Name or ARN of the secret in Secrets Manager.
    #[schemars(length(min = 1, max = 2048))]
    pub secret_id: String,
    /// AWS region of the secret; the operator's default region when absent. Must be one of the
    /// operator's allowed regions; with an ARN, it may only repeat the ARN's region.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(min = 4, max = 32),
        regex(pattern = r"^[a-z]{2}(-[a-z]+)+-[0-9]{1,2}$")
    )]
    pub region: Option<String>,
    /// The staging label to read (AWSCURRENT when neither this nor versionId is set).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 256), regex(pattern = r"^[A-Za-z0-9_+=.@-]+$"))]
    pub version_stage: Option<String>,
    /// A pinned version id to read instead of a staging label.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 32, max = 64), regex(pattern = r"^[A-Za-z0-9-]+$"))]
    pub version_id: Option<String>,
    /// `Json`: a JSON object with PEM (or base64 DER) values; `Pem`: one PEM bundle; `Pkcs12`: a
    /// PKCS#12 file stored as SecretBinary (a partner's `.p12`, an ACM export), or as SecretString
    /// `{"pkcs12": "<base64>", "password": "..."}`.
    #[serde(default)]
    pub format: SourceFormat,
    /// For format Pkcs12: the key of a Secret in the identity's namespace that holds the file's
    /// password (needed for SecretBinary; a `password` field of the JSON form wins over it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_secret_ref: Option<SecretKeyRef>,
    /// JSON field names, for format Json.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fields: Option<JsonFieldNames>,
    /// A separate secret with the CA certificate(s) in PEM, for format Pem; the same policy as
    /// `secretId` applies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 2048))]
    pub ca_secret_id: Option<String>,
    /// An IAM role (usually in another account) the operator assumes to read the secret(s). It must
    /// be allowed for this namespace by the operator's `--allowed-role`; names then resolve in the
    /// role's account.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(min = 20, max = 2048),
        regex(pattern = r"^arn:aws[a-z-]*:iam::[0-9]{12}:role/[A-Za-z0-9/_+=,.@-]+$")
    )]
    pub role_arn: Option<String>,
    /// The external id the role's trust policy asks for (`sts:ExternalId`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(min = 2, max = 1224),
        regex(pattern = r"^[A-Za-z0-9+=,.@:/_-]+$")
    )]
    pub external_id: Option<String>,
}

impl SourceSpec {
    /// The version selector as the API asks for it: a pinned id, or a stage (AWSCURRENT by default).
    pub fn version(&self) -> VersionSelector {
        match (&self.version_id, &self.version_stage) {
            (Some(id), _) => VersionSelector::Id(id.clone()),
            (None, Some(stage)) => VersionSelector::Stage(stage.clone()),
            (None, None) => VersionSelector::Stage("AWSCURRENT".to_string()),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum VersionSelector {
    Stage(String),
    Id(String),
}

#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SourceFormat {
    #[default]
    Json,
    Pem,
    /// A PKCS#12 file stored as SecretBinary; its password from `passwordSecretRef`.
    Pkcs12,
}

#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct JsonFieldNames {
    #[serde(default = "default_certificate_field")]
    #[schemars(length(min = 1, max = 256))]
    pub certificate: String,
    #[serde(default = "default_private_key_field")]
    #[schemars(length(min = 1, max = 256))]
    pub private_key: String,
    #[serde(default = "default_ca_field")]
    #[schemars(length(min = 1, max = 256))]
    pub ca: String,
}

fn default_certificate_field() -> String {
    "certificate".to_string()
}
fn default_private_key_field() -> String {
    "private_key".to_string()
}
fn default_ca_field() -> String {
    "ca".to_string()
}

impl Default for JsonFieldNames {
    fn default() -> Self {
        Self {
            certificate: default_certificate_field(),
            private_key: default_private_key_field(),
            ca: default_ca_field(),
        }
    }
}

#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct TargetSpec {
    /// Name of the Secret to write, in the identity's namespace; defaults to the identity's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
    )]
    pub secret_name: Option<String>,
    /// More formats in the same Secret, named and laid out as cert-manager's
    /// `additionalOutputFormats` (so manifests port over): `CombinedPEM` adds `tls-combined.pem`
    /// (the key, then the chain), `DER` adds `key.der` (the key as DER).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 2))]
    pub additional_output_formats: Vec<AdditionalOutputFormat>,
    /// Keystores for Java, Kafka, JDBC and .NET clients.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keystores: Option<KeystoresSpec>,
}

#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct KeystoresSpec {
    /// `keystore.p12` (the key with the leaf, the intermediates and the CA) and `truststore.p12`
    /// (the CA certificates), both under the password of `passwordSecretRef`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pkcs12: Option<Pkcs12Spec>,
}

#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Pkcs12Spec {
    /// A key of a Secret in the identity's namespace that holds the keystore password.
    pub password_secret_ref: SecretKeyRef,
    /// `Modern` (default): AES-256 and HMAC-SHA256, for Java 17+, OpenSSL 3, .NET. `Legacy`: 3DES
    /// and HMAC-SHA1, for old JREs and OpenSSL 1.x.
    #[serde(default)]
    pub profile: Pkcs12Profile,
    /// The key entry's alias; default: the identity's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub alias: Option<String>,
}

#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyRef {
    /// A Secret in the identity's own namespace: a plain name (a DNS subdomain), so it can never
    /// be a path to another namespace's Secret.
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
    )]
    pub name: String,
    /// A key of that Secret (the characters Kubernetes allows in Secret keys).
    #[schemars(length(min = 1, max = 253), regex(pattern = r"^[-._a-zA-Z0-9]+$"))]
    pub key: String,
}

#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Pkcs12Profile {
    #[default]
    Modern,
    Legacy,
}

#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct AdditionalOutputFormat {
    #[serde(rename = "type")]
    pub type_: OutputFormatType,
}

#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutputFormatType {
    /// `tls-combined.pem`: the private key, then the certificate chain.
    #[serde(rename = "CombinedPEM")]
    CombinedPem,
    /// `key.der`: the private key as DER.
    #[serde(rename = "DER")]
    Der,
}

impl MtlsIdentitySpec {
    /// The PKCS#12 keystore the target Secret holds, if any.
    pub fn pkcs12(&self) -> Option<&Pkcs12Spec> {
        self.target.as_ref()?.keystores.as_ref()?.pkcs12.as_ref()
    }

    /// The name of the Secret the identity named `identity` writes.
    pub fn target_secret_name(&self, identity: Option<&str>) -> String {
        self.target
            .as_ref()
            .and_then(|target| target.secret_name.clone())
            .unwrap_or_else(|| identity.unwrap_or_default().to_string())
    }
}

impl MtlsIdentity {
    /// The PKCS#12 keystore the target Secret holds, if any.
    pub fn pkcs12(&self) -> Option<&Pkcs12Spec> {
        self.spec.pkcs12()
    }

    /// The extra formats the target Secret holds.
    pub fn output_formats(&self) -> Vec<OutputFormatType> {
        self.spec
            .target
            .iter()
            .flat_map(|target| &target.additional_output_formats)
            .map(|format| format.type_)
            .collect()
    }
}

#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct RestartSpec {
    #[serde(default)]
    pub policy: RestartPolicy,
    /// The workloads to restart; empty: every Deployment, StatefulSet and DaemonSet in the namespace
    /// whose pod template uses the Secret. A listed workload that does not use the Secret is not
    /// restarted (Event `WorkloadNotUsingSecret`) unless `force` is set.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 100))]
    pub workloads: Vec<WorkloadRef>,
    /// Restart the listed workloads even if their pod template does not use the Secret (for
    /// applications that read the certificate another way, such as a CSI driver).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub force: bool,
    /// Also restart when the keystores change without a new certificate (a new password, alias or
    /// profile): for clients that read the password once at start (an env var) but reload the
    /// keystore file. Default: the keystores are rendered again without a rollout.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub on_password_change: bool,
}

#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum RestartPolicy {
    /// A rolling restart through a pod-template annotation derived from the certificate.
    #[default]
    Rollout,
    /// Annotate the running Pods (the kubelet refreshes the mounted files promptly); no restart.
    Annotate,
    /// Only the Secret changes.
    None,
}

#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadRef {
    pub kind: WorkloadKind,
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
    )]
    pub name: String,
}

#[derive(
    JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord,
)]
pub enum WorkloadKind {
    Deployment,
    StatefulSet,
    DaemonSet,
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ExpirySpec {
    /// Warn this long before notAfter (a Go-style duration); default 720h (30 days).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 2, max = 32))]
    #[x_kube(validation = kube::core::Rule::new(
        "self.matches('^([0-9]+(ms|s|m|h))+$')"
    ).message("warnBefore must be a duration such as 720h"))]
    pub warn_before: Option<String>,
}

/// What the operator observed and did; deterministic, so writing it does not trigger more work.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct MtlsIdentityStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// The source version the Secret was written from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<SourceStatus>,
    /// Facts of the certificate in the Secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate: Option<CertificateStatus>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_name: Option<String>,
    /// The last rotation: a new certificate replacing one that was already in the Secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_rotation: Option<RotationStatus>,
    /// The last refresh request honoured (the `mtls-operator.io/refresh-requested-at` annotation).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_refresh: Option<RefreshStatus>,
}

#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct RefreshStatus {
    /// The annotation's value that was honoured (its first 64 characters).
    pub requested: String,
    /// When the operator honoured it (RFC 3339).
    pub time: String,
}

#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct RotationStatus {
    pub from_version_id: String,
    pub to_version_id: String,
    /// SHA-256 of the new certificate: the restart token written to pod templates.
    pub sha256_fingerprint: String,
    /// When the operator wrote the new certificate (RFC 3339).
    pub time: String,
    /// Workloads restarted (or, for `Annotate`, whose Pods were annotated) for this rotation.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub restarted_workloads: Vec<String>,
    /// Every affected workload has been handled.
    pub complete: bool,
    /// Set when this rotation is a keystore change without a new certificate
    /// (`spec.restart.onPasswordChange`): the restart token written to pod templates instead of the
    /// fingerprint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restart_token: Option<String>,
}

/// A status condition: Kubernetes' own `meta/v1` Condition, so `kubectl wait --for=condition=Ready`,
/// kstatus and every other tool that reads conditions understand it. `lastTransitionTime` changes
/// only when `status` changes.
pub use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;

#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct SourceStatus {
    pub arn: String,
    pub version_id: String,
}

#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct CertificateStatus {
    pub subject: String,
    pub issuer: String,
    pub serial_number: String,
    /// RFC 3339.
    pub not_before: String,
    /// RFC 3339.
    pub not_after: String,
    pub sha256_fingerprint: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dns_names: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub uris: Vec<String>,
}

impl MtlsIdentity {
    /// The name of the Secret this identity writes.
    pub fn target_secret_name(&self) -> String {
        self.spec.target_secret_name(self.metadata.name.as_deref())
    }

    pub fn ready_condition(&self) -> Option<&Condition> {
        self.status
            .as_ref()
            .and_then(|status| status.conditions.iter().find(|c| c.type_ == "Ready"))
    }

    /// The refresh request the identity carries that status has not honoured yet, as status will
    /// echo it (cut to [`REFRESH_VALUE_MAX`] characters).
    pub fn pending_refresh(&self) -> Option<String> {
        let requested = refresh_value(
            self.metadata
                .annotations
                .as_ref()?
                .get(REFRESH_ANNOTATION)?,
        );
        let honoured = self
            .status
            .as_ref()
            .and_then(|status| status.last_refresh.as_ref())
            .map(|refresh| refresh.requested.as_str());
        (!requested.is_empty() && honoured != Some(requested.as_str())).then_some(requested)
    }
}

/// A refresh request's value as status echoes it: its first [`REFRESH_VALUE_MAX`] characters.
pub fn refresh_value(annotation: &str) -> String {
    annotation.chars().take(REFRESH_VALUE_MAX).collect()
}

/// The CRD as YAML, exactly as committed in `crds/`.
pub fn crd_yaml() -> Result<String, serde_yaml::Error> {
    serde_yaml::to_string(&MtlsIdentity::crd())
}

/// Parses a Go-style duration (`1h30m`, `45s`, `500ms`): the one duration grammar of the CRD (its
/// CEL rule accepts exactly this) and of every flag. The grammar is checked here, strictly (no
/// spaces, no `d`, no words, as Kubernetes' `duration()` would refuse them); humantime computes it.
pub fn parse_duration(text: &str) -> Option<std::time::Duration> {
    let mut rest = text;
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !c.is_ascii_digit())?;
        if digits == 0 {
            return None;
        }
        rest = &rest[digits..];
        rest = ["ms", "s", "m", "h"]
            .iter()
            .find_map(|unit| rest.strip_prefix(unit))?;
    }
    humantime::parse_duration(text).ok()
}

/// [`parse_duration`] for command-line flags (clap's `value_parser`).
pub fn duration_flag(text: &str) -> Result<std::time::Duration, String> {
    parse_duration(text)
        .ok_or_else(|| format!("{text:?} is not a duration such as 10s, 5m, 1h30m or 500ms"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn committed_crd_matches_the_types() {
        let committed = include_str!("../../crds/mtlsidentity.yaml");
        let generated = crd_yaml().unwrap_or_default();
        assert!(
            committed == generated,
            "crds/mtlsidentity.yaml drifted from src/api: run `cargo run -- crd > crds/mtlsidentity.yaml`"
        );
    }

    #[test]
    fn chart_crd_matches_the_types() {
        let in_chart = include_str!("../../charts/mtls-operator/crds/mtlsidentity.yaml");
        assert!(
            in_chart == crd_yaml().unwrap_or_default(),
            "charts/mtls-operator/crds/mtlsidentity.yaml drifted: copy crds/mtlsidentity.yaml there"
        );
    }

    /// Every list, map and string a tenant writes in `spec` has a bound (#23 hole 3): the operator
    /// keeps every identity in memory, so an unbounded field is a way to exhaust it.
    #[test]
    fn every_list_map_and_string_in_the_spec_is_bounded() {
        fn unbounded(schema: &serde_json::Value, path: &str, found: &mut Vec<String>) {
            let kind = schema.get("type").and_then(|kind| kind.as_str());
            let has = |key: &str| schema.get(key).is_some();
            match kind {
                Some("string") if !has("maxLength") && !has("enum") => found.push(path.into()),
                Some("array") if !has("maxItems") => found.push(path.into()),
                Some("object") if has("additionalProperties") && !has("maxProperties") => {
                    found.push(path.into())
                }
                _ => {}
            }
            if let Some(properties) = schema.get("properties").and_then(|p| p.as_object()) {
                for (name, child) in properties {
                    unbounded(child, &format!("{path}.{name}"), found);
                }
            }
            if let Some(items) = schema.get("items") {
                unbounded(items, &format!("{path}[]"), found);
            }
            if let Some(values) = schema.get("additionalProperties").filter(|v| v.is_object()) {
                unbounded(values, &format!("{path}{{}}"), found);
            }
        }
        let crd = serde_json::to_value(MtlsIdentity::crd()).unwrap_or_default();
        let spec = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"];
        assert!(
            spec.get("properties").is_some(),
            "the spec's schema was found"
        );
        let mut found = Vec::new();
        unbounded(spec, "spec", &mut found);
        assert!(found.is_empty(), "unbounded in the CRD: {found:?}");
    }

    #[test]
    fn crd_carries_the_cel_rules_and_columns() {
        let yaml = crd_yaml().unwrap_or_default();
        assert!(yaml.contains("set versionStage or versionId, not both"));
        assert!(yaml.contains("x-kubernetes-validations"));
        for column in ["Ready", "Reason", "Expires", "Age"] {
            assert!(yaml.contains(&format!("name: {column}")), "{column}");
        }
        assert!(yaml.contains("shortNames:\n    - mtlsid"));
    }

    #[test]
    fn durations_parse_like_go() {
        use std::time::Duration;
        assert_eq!(parse_duration("1h"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_duration("1h30m"), Some(Duration::from_secs(5400)));
        assert_eq!(parse_duration("45s"), Some(Duration::from_secs(45)));
        assert_eq!(parse_duration("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_duration(""), None);
        assert_eq!(parse_duration("1d"), None);
        assert_eq!(parse_duration("h"), None);
        assert_eq!(parse_duration("10"), None);
        // humantime alone would take these; the CRD's grammar does not.
        assert_eq!(parse_duration("1h 30m"), None);
        assert_eq!(parse_duration("2hours"), None);
        assert_eq!(parse_duration("1m30s"), Some(Duration::from_secs(90)));
        assert!(duration_flag("1d").is_err_and(|e| e.contains("1h30m")));
    }

    #[test]
    fn version_defaults_to_awscurrent_and_prefers_a_pinned_id() {
        let mut source = SourceSpec {
            secret_id: "ns/x".into(),
            region: None,
            version_stage: None,
            version_id: None,
            format: SourceFormat::Json,
            fields: None,
            ca_secret_id: None,
            role_arn: None,
            external_id: None,
            password_secret_ref: None,
        };
        assert_eq!(
            source.version(),
            VersionSelector::Stage("AWSCURRENT".into())
        );
        source.version_stage = Some("AWSPENDING".into());
        assert_eq!(
            source.version(),
            VersionSelector::Stage("AWSPENDING".into())
        );
        source.version_id = Some("v".repeat(32));
        assert_eq!(source.version(), VersionSelector::Id("v".repeat(32)));
    }
}
