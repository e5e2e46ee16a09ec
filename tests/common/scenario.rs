//! The preamble most tests share, once: a namespace of their own, an operator watching it, a CA,
//! and identities whose source is a good certificate of that CA, created and waited for.

use anyhow::Result;
use mtls_operator::controller::Settings;
use xtask::support;

use super::{
    Leaf, LeafOptions, Operator, TestCa, create_identity, identity, json_secret, put_source,
    start_operator_with, wait_ready,
};

pub struct Scenario {
    pub namespace: String,
    pub operator: Operator,
    pub ca: TestCa,
}

impl Scenario {
    /// A namespace named after `prefix`, an operator with the default settings, a CA.
    pub async fn start(prefix: &str) -> Result<Self> {
        Self::start_with(prefix, Settings::default()).await
    }

    pub async fn start_with(prefix: &str, settings: Settings) -> Result<Self> {
        let namespace = support::create_namespace(prefix, &[]).await?;
        let operator = start_operator_with(&namespace, settings).await?;
        let ca = TestCa::new(&format!("{prefix} CA"))?;
        Ok(Self {
            namespace,
            operator,
            ca,
        })
    }

    /// The namespace, the operator and the CA, for a test that goes on by hand.
    pub fn parts(self) -> (String, Operator, TestCa) {
        (self.namespace, self.operator, self.ca)
    }

    /// The Secrets Manager id of `source` in this namespace (`<namespace>/<source>`).
    pub fn id(&self, source: &str) -> String {
        format!("{}/{source}", self.namespace)
    }

    /// A new client certificate of the CA, stored as JSON under [`Scenario::id`]; returns it and
    /// the version.
    pub async fn put_good(&self, source: &str) -> Result<(Leaf, String)> {
        let leaf = self.ca.leaf(&LeafOptions::default())?;
        let version = put_source(
            &self.id(source),
            &json_secret(&leaf.cert_pem, &leaf.key_pem, &self.ca.pem()),
        )
        .await?;
        Ok((leaf, version))
    }

    /// Identity `name` reading `source`, with `extra_spec` merged into its spec.
    pub async fn create(
        &self,
        name: &str,
        source: &str,
        extra_spec: serde_json::Value,
    ) -> Result<()> {
        create_identity(
            &self.namespace,
            &identity(name, &self.id(source), extra_spec)?,
        )
        .await
    }

    /// A good source, an identity on it, and the wait until it is Ready: the certificate and the
    /// version it synced.
    pub async fn synced(
        &self,
        name: &str,
        source: &str,
        extra_spec: serde_json::Value,
    ) -> Result<(Leaf, String)> {
        let stored = self.put_good(source).await?;
        self.create(name, source, extra_spec).await?;
        wait_ready(&self.namespace, name, "True", "Synced").await?;
        Ok(stored)
    }
}
