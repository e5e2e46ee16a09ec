//! `mtls-operator check`: certificate material checked with exactly the operator's rules (the same
//! parser and validation, the same reasons) before anyone stores or rotates it. From files, or read
//! only from Secrets Manager with the operator's credentials chain. Exit 0 when the operator would
//! sync it, 1 when it would refuse it (or it cannot be read).

use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::api::{CertificateStatus, VersionSelector};
use crate::pki::{self, JsonFields, Material, Stored, StoredFormat};
use crate::source::{AssumedRole, SecretRef, SecretSource, SecretsManagerSource};

#[derive(clap::Args, Debug)]
#[command(group = clap::ArgGroup::new("input").required(true).multiple(false)
    .args(["cert", "bundle", "json", "pkcs12", "secret_id"]))]
pub struct CheckArgs {
    /// The leaf certificate, then any intermediates (PEM); with --key.
    #[arg(long, requires = "key")]
    cert: Option<PathBuf>,
    /// The private key of --cert (PEM, not encrypted).
    #[arg(long, requires = "cert")]
    key: Option<PathBuf>,
    /// CA certificate(s) (PEM) to verify the chain against, with --cert/--key, --bundle or a Pem
    /// secret (as `caSecretId` would hold them).
    #[arg(long)]
    ca: Option<PathBuf>,
    /// One PEM bundle: leaf, intermediates and exactly one key (format Pem).
    #[arg(long)]
    bundle: Option<PathBuf>,
    /// The JSON a Secrets Manager secret would hold (format Json).
    #[arg(long)]
    json: Option<PathBuf>,
    /// A PKCS#12 file, or its JSON form {"pkcs12": "<base64>", "password": "..."} (format Pkcs12).
    #[arg(long)]
    pkcs12: Option<PathBuf>,
    /// A file holding the PKCS#12 password (a file, not a flag, so it stays out of shell history).
    #[arg(long)]
    password_file: Option<PathBuf>,
    /// Read this secret (name or ARN) from Secrets Manager: one GetSecretValue, nothing written.
    #[arg(long)]
    secret_id: Option<String>,
    /// The secret's region (default: the AWS configuration's).
    #[arg(long, requires = "secret_id")]
    region: Option<String>,
    /// The staging label to read (default AWSCURRENT): check AWSPENDING before it goes live.
    #[arg(long, requires = "secret_id", conflicts_with = "version_id")]
    version_stage: Option<String>,
    /// A version id to read.
    #[arg(long, requires = "secret_id")]
    version_id: Option<String>,
    /// How the secret holds the material, as `spec.source.format`.
    #[arg(long, value_enum, default_value_t = Format::Json, requires = "secret_id")]
    format: Format,
    /// A role to assume for the read, as `spec.source.roleArn`.
    #[arg(long, requires = "secret_id")]
    role_arn: Option<String>,
    /// The external id for --role-arn.
    #[arg(long, requires = "role_arn")]
    external_id: Option<String>,
    /// JSON field names, as `spec.source.fields`.
    #[arg(long, default_value = "certificate")]
    field_certificate: String,
    #[arg(long, default_value = "private_key")]
    field_private_key: String,
    #[arg(long, default_value = "ca")]
    field_ca: String,
    /// `text` for people, `json` for pipelines.
    #[arg(long, value_enum, default_value_t = Output::Text)]
    output: Output,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Json,
    Pem,
    Pkcs12,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Output {
    Text,
    Json,
}

/// The verdict and what the material says about itself.
#[derive(Serialize, Debug)]
#[serde(rename_all = "camelCase")]
pub struct Report {
    /// The operator would sync it.
    pub ok: bool,
    /// The reason the identity would show (`Expired`, `KeyMismatch`, ...), when refused.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub message: String,
    /// The version read, for --secret-id.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source: Option<SourceFacts>,
    /// The leaf's facts, whenever the material parsed (also when validation refused it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub certificate: Option<Box<Facts>>,
}

#[derive(Serialize, Debug)]
#[serde(rename_all = "camelCase")]
pub struct SourceFacts {
    pub arn: String,
    pub version_id: String,
}

#[derive(Serialize, Debug)]
#[serde(rename_all = "camelCase")]
pub struct Facts {
    /// The facts status would show (subject, issuer, serial, validity, fingerprint, SANs).
    #[serde(flatten)]
    pub leaf: CertificateStatus,
    /// Extended key usages by name; empty: no extension (any purpose).
    pub extended_key_usage: Vec<String>,
    /// The key's type, e.g. `ECDSA P-256`, when it loads.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// Leaf first, then intermediates: each certificate's subject.
    pub chain: Vec<String>,
    /// The CA certificates' subjects.
    pub ca: Vec<String>,
}

/// Runs the check; prints the report; returns whether the material is good.
pub async fn run(args: CheckArgs) -> bool {
    let report = check(&args).await;
    match args.output {
        Output::Json => match serde_json::to_string_pretty(&report) {
            Ok(json) => println!("{json}"),
            Err(error) => eprintln!("cannot render the report: {error}"),
        },
        Output::Text => print!("{}", render_text(&report)),
    }
    report.ok
}

async fn check(args: &CheckArgs) -> Report {
    let fields = JsonFields {
        certificate: args.field_certificate.clone(),
        private_key: args.field_private_key.clone(),
        ca: args.field_ca.clone(),
    };
    let read = |path: &Path| {
        std::fs::read(path)
            .map_err(|error| Report::refused(None, format!("{}: {error}", path.display())))
    };
    let text = |bytes: Vec<u8>, path: &Path| {
        String::from_utf8(bytes)
            .map_err(|_| Report::refused(None, format!("{} is not UTF-8 text", path.display())))
    };
    let outcome: Result<(Material, Option<SourceFacts>), Report> = async {
        let ca = match &args.ca {
            Some(path) => Some(text(read(path)?, path)?),
            None => None,
        };
        let password = match &args.password_file {
            Some(path) => Some(
                text(read(path)?, path)?
                    .trim_end_matches(['\r', '\n'])
                    .to_string(),
            ),
            None => None,
        };
        if let (Some(cert), Some(key)) = (&args.cert, &args.key) {
            // As the JSON value the README builds from these files (`jq --rawfile`), each file in
            // its own field: a key given as --cert is refused as the operator would refuse that
            // JSON (read as one PEM bundle, swapped files looked fine).
            let mut value = serde_json::Map::new();
            value.insert(fields.certificate.clone(), text(read(cert)?, cert)?.into());
            value.insert(fields.private_key.clone(), text(read(key)?, key)?.into());
            if let Some(ca) = &ca {
                value.insert(fields.ca.clone(), ca.clone().into());
            }
            let json = serde_json::Value::Object(value).to_string();
            return material(Stored::Text(&json), StoredFormat::Json(&fields)).map(|m| (m, None));
        }
        if let Some(path) = &args.bundle {
            let bundle = text(read(path)?, path)?;
            let format = StoredFormat::Pem { ca: ca.as_deref() };
            return material(Stored::Text(&bundle), format).map(|m| (m, None));
        }
        if let Some(path) = &args.json {
            let bytes = read(path)?;
            return material(Stored::Binary(&bytes), StoredFormat::Json(&fields))
                .map(|m| (m, None));
        }
        if let Some(path) = &args.pkcs12 {
            let bytes = read(path)?;
            let format = StoredFormat::Pkcs12 {
                password: password.as_deref(),
            };
            // The JSON form is text; a .p12 is binary.
            let stored = match std::str::from_utf8(&bytes) {
                Ok(text) if text.trim_start().starts_with('{') => Stored::Text(text),
                _ => Stored::Binary(&bytes),
            };
            return material(stored, format).map(|m| (m, None));
        }
        let Some(secret_id) = &args.secret_id else {
            return Err(Report::refused(None, "nothing to check".into()));
        };
        let aws = aws_config::defaults(aws_config::BehaviorVersion::latest())
            .load()
            .await;
        let region = args
            .region
            .clone()
            .or_else(|| secret_region(secret_id))
            .or_else(|| aws.region().map(|region| region.to_string()))
            .ok_or_else(|| {
                Report::refused(None, "no region: pass --region, or set AWS_REGION".into())
            })?;
        let version = match (&args.version_id, &args.version_stage) {
            (Some(id), _) => VersionSelector::Id(id.clone()),
            (None, Some(stage)) => VersionSelector::Stage(stage.clone()),
            (None, None) => VersionSelector::Stage("AWSCURRENT".into()),
        };
        let request = SecretRef {
            secret_id: secret_id.clone(),
            region,
            role: args.role_arn.as_ref().map(|arn| AssumedRole {
                arn: arn.clone(),
                external_id: args.external_id.clone(),
                namespace: None,
            }),
            version,
        };
        let fetched = SecretsManagerSource::new(aws)
            .fetch(&request, "")
            .await
            .map_err(|error| {
                Report::refused(
                    Some(error.reason().as_str()),
                    format!("{error} ({})", error.detail()),
                )
            })?;
        let format = match args.format {
            Format::Json => StoredFormat::Json(&fields),
            Format::Pem => StoredFormat::Pem { ca: ca.as_deref() },
            Format::Pkcs12 => StoredFormat::Pkcs12 {
                password: password.as_deref(),
            },
        };
        let source = SourceFacts {
            arn: fetched.arn.clone(),
            version_id: fetched.version_id.clone(),
        };
        material(fetched.content.stored(), format)
            .map(|m| (m, Some(source)))
            .map_err(|mut report| {
                report.message = format!(
                    "version {} of {secret_id}: {}",
                    fetched.version_id, report.message
                );
                report
            })
    }
    .await;
    let (material, source) = match outcome {
        Ok(read) => read,
        Err(report) => return report,
    };
    let certificate = describe(&material);
    let now = chrono::Utc::now().timestamp();
    match pki::validate(&material, now) {
        Ok(_) => Report {
            ok: true,
            reason: None,
            message: "OK: the operator would sync this material".into(),
            source,
            certificate,
        },
        Err(error) => Report {
            ok: false,
            reason: Some(error.reason().to_string()),
            message: error.to_string(),
            source,
            certificate,
        },
    }
}

fn material(stored: Stored<'_>, format: StoredFormat<'_>) -> Result<Material, Report> {
    pki::read_material(stored, format)
        .map_err(|error| Report::refused(Some(error.reason().as_str()), error.to_string()))
}

/// An ARN names its region.
fn secret_region(secret_id: &str) -> Option<String> {
    match crate::source::id::parse_secret_id(secret_id).ok()? {
        crate::source::id::SecretId::Arn(arn) => Some(arn.region),
        crate::source::id::SecretId::Name(_) => None,
    }
}

impl Report {
    fn refused(reason: Option<&str>, message: String) -> Self {
        Self {
            ok: false,
            reason: reason.map(str::to_string),
            message,
            source: None,
            certificate: None,
        }
    }
}

fn describe(material: &Material) -> Option<Box<Facts>> {
    let (leaf, usages) = pki::certificate_facts(material.chain.first()?)?;
    let subject_of = |der| pki::certificate_facts(der).map(|(facts, _)| facts.subject);
    Some(Box::new(Facts {
        leaf: crate::controller::decide::facts_status(&leaf),
        extended_key_usage: usages,
        key: material.key.load().ok().map(|(kind, _)| kind.name()),
        chain: material.chain.iter().filter_map(subject_of).collect(),
        ca: material.ca.iter().filter_map(subject_of).collect(),
    }))
}

fn render_text(report: &Report) -> String {
    let mut out = String::new();
    let mut line = |label: &str, value: &str| {
        if !value.is_empty() {
            out.push_str(&format!("{label:<13}{value}\n"));
        }
    };
    if let Some(source) = &report.source {
        line("secret", &source.arn);
        line("version", &source.version_id);
    }
    if let Some(facts) = &report.certificate {
        let leaf = &facts.leaf;
        line("subject", &leaf.subject);
        line("issuer", &leaf.issuer);
        line("serial", &leaf.serial_number);
        line(
            "valid",
            &format!("{} to {}", leaf.not_before, leaf.not_after),
        );
        line("dns names", &leaf.dns_names.join(", "));
        line("uris", &leaf.uris.join(", "));
        let usages = if facts.extended_key_usage.is_empty() {
            "(no extension: any purpose)".to_string()
        } else {
            facts.extended_key_usage.join(", ")
        };
        line("ext key use", &usages);
        line("key", facts.key.as_deref().unwrap_or("(does not load)"));
        line(
            "fingerprint",
            &format!("sha256:{}", leaf.sha256_fingerprint),
        );
        line("chain", &facts.chain.join(" <- "));
        line("ca", &facts.ca.join(", "));
    }
    match &report.reason {
        None => out.push_str(&format!("{}\n", report.message)),
        Some(reason) => out.push_str(&format!("REFUSED {reason}: {}\n", report.message)),
    }
    out
}
