//! Tenancy: which Secrets Manager secrets an identity in a namespace may read through the operator's
//! IAM role. Decided twice: on the id as written, before any call, and on the canonical ARN and name
//! that Secrets Manager returns, before anything is written.
//!
//! A pattern is a glob (`*` matches any run of characters, `/` included) with a `{namespace}`
//! placeholder, which is substituted as literal text (never as glob syntax). The secure default is
//! `{namespace}/*`: a namespace reads only secrets named under its own prefix.
//!
//! - Name patterns (not starting with `arn:`) apply only to secrets in the operator's own account.
//! - `arn:` patterns match the whole ARN: the only way to allow another account's secrets.
//! - Every secret must be in an allowed region (default: the operator's own region).
//! - A role to assume (`spec.source.roleArn`) must match one of the namespace's `--allowed-role`
//!   patterns (default: none). Read through a role, the role's account takes the place of the
//!   operator's own: names resolve there, and name patterns apply to its secrets.

use super::id::{RoleArn, SecretArn, SecretId, partition_of, strip_suffix};

pub const DEFAULT_PATTERN: &str = "{namespace}/*";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourcePolicy {
    patterns: Vec<String>,
    /// The operator's own AWS account; `None` when unknown, and then ARN ids need an `arn:` pattern.
    own_account: Option<String>,
    /// Regions identities may read from; empty allows none.
    allowed_regions: Vec<String>,
    /// Role ARN patterns (with `{namespace}`) a namespace may have the operator assume; empty
    /// allows none.
    allowed_roles: Vec<String>,
    /// `--tenant-role-arn`: every read goes through a session of this role (or of the identity's
    /// own `spec.source.roleArn`) tagged with the identity's namespace, so that IAM holds each
    /// namespace to its own secrets too. `None`: the operator's own credentials.
    tenant_role: Option<String>,
}

/// Why the policy refused a secret; kept for the operator's log, never shown to the tenant.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Denied {
    #[error("region {0} is not among the allowed regions")]
    Region(String),
    #[error("account {0} is not the operator's own and no arn: pattern allows it")]
    Account(String),
    #[error("name {0} matches no allowed pattern")]
    Name(String),
    #[error("Secrets Manager resolved the id to {0}, which is not what was asked")]
    Resolved(String),
    #[error("role {0} matches no --allowed-role pattern for this namespace")]
    Role(String),
    #[error("partition {0} is not the partition of the region asked")]
    Partition(String),
}

/// A secret as the policy sees it: where it is and what it may be called.
struct Location<'a> {
    region: &'a str,
    /// The secret is in the operator's own account.
    own_account: bool,
    account: &'a str,
    /// Every name Secrets Manager could resolve the id to; each must be allowed.
    names: Vec<&'a str>,
    /// The ARN, for `arn:` patterns.
    arn: Option<String>,
}

/// `--allowed-role` patterns from one value: comma-separated, but split only where the next
/// pattern starts with `arn:`, because IAM role names may contain commas
/// (`arn:aws:iam::1:role/a,b` is one pattern). Empty patterns are dropped.
pub fn split_role_patterns(value: &str) -> Vec<String> {
    let mut patterns: Vec<String> = Vec::new();
    for piece in value.split(',') {
        match patterns.last_mut() {
            Some(last) if !piece.trim_start().starts_with("arn:") => {
                last.push(',');
                last.push_str(piece);
            }
            _ => patterns.push(piece.to_string()),
        }
    }
    patterns
        .into_iter()
        .map(|pattern| pattern.trim().to_string())
        .filter(|pattern| !pattern.is_empty())
        .collect()
}

impl SourcePolicy {
    /// `patterns` empty: the default `{namespace}/*`.
    pub fn new(
        patterns: Vec<String>,
        own_account: Option<String>,
        allowed_regions: Vec<String>,
    ) -> Self {
        let patterns = if patterns.is_empty() {
            vec![DEFAULT_PATTERN.to_string()]
        } else {
            patterns
        };
        Self {
            patterns,
            own_account,
            allowed_regions,
            allowed_roles: Vec::new(),
            tenant_role: None,
        }
    }

    /// Roles namespaces may have the operator assume: ARN globs with `{namespace}`.
    pub fn with_allowed_roles(self, allowed_roles: Vec<String>) -> Self {
        Self {
            allowed_roles,
            ..self
        }
    }

    /// Per-namespace sessions of `tenant_role` (see the field).
    pub fn with_tenant_role(self, tenant_role: Option<String>) -> Self {
        Self {
            tenant_role,
            ..self
        }
    }

    /// The tenant role, when per-namespace sessions are on.
    pub fn tenant_role(&self) -> Option<&str> {
        self.tenant_role.as_deref()
    }

    /// The same patterns and roles, with the account and regions the AWS configuration gave.
    pub fn with_account_and_regions(
        self,
        own_account: Option<String>,
        allowed_regions: Vec<String>,
    ) -> Self {
        Self {
            own_account,
            allowed_regions,
            ..self
        }
    }

    pub fn allowed_roles(&self) -> &[String] {
        &self.allowed_roles
    }

    /// Before any call, STS's included: may `namespace` have the operator assume `role`?
    pub fn check_role(&self, namespace: &str, role: &RoleArn) -> Result<(), Denied> {
        let role = role.to_string();
        if self
            .allowed_roles
            .iter()
            .any(|pattern| glob_matches(pattern, namespace, &role))
        {
            Ok(())
        } else {
            Err(Denied::Role(role))
        }
    }

    /// The account a plain name resolves in: the role's, when one is assumed, else the operator's.
    fn home_account<'a>(&'a self, role: Option<&'a RoleArn>) -> Option<&'a str> {
        match role {
            Some(role) => Some(role.account.as_str()),
            None => self.own_account.as_deref(),
        }
    }

    /// Any secret of any account in `regions`: for tests and single-tenant clusters.
    pub fn allow_all(regions: Vec<String>) -> Self {
        Self::new(vec!["*".into(), "arn:*".into()], None, regions)
    }

    pub fn patterns(&self) -> &[String] {
        &self.patterns
    }

    /// The source and role patterns in which `{namespace}` is not fenced off (see
    /// [`is_ambiguous`]): what the operator refuses to start with.
    pub fn ambiguous_patterns(&self) -> Vec<&str> {
        self.patterns
            .iter()
            .chain(&self.allowed_roles)
            .map(String::as_str)
            .filter(|pattern| is_ambiguous(pattern))
            .collect()
    }

    pub fn allowed_regions(&self) -> &[String] {
        &self.allowed_regions
    }

    pub fn own_account(&self) -> Option<&str> {
        self.own_account.as_deref()
    }

    /// Before any call: may `namespace` read `id` in `region` (the region the call would go to),
    /// through `role` (already allowed by `check_role`) or the operator's own credentials?
    pub fn check_request(
        &self,
        namespace: &str,
        id: &SecretId,
        region: &str,
        role: Option<&RoleArn>,
    ) -> Result<(), Denied> {
        let home = self.home_account(role);
        let location = match id {
            SecretId::Name(name) => Location {
                region,
                // A name always resolves in the caller's own account.
                own_account: true,
                account: home.unwrap_or("(own)"),
                names: vec![name.as_str()],
                arn: None,
            },
            SecretId::Arn(arn) => {
                if arn.region != region {
                    return Err(Denied::Region(arn.region.clone()));
                }
                // Accounts are numbered per partition: the same twelve digits in another
                // partition are another account.
                if arn.partition != partition_of(region) {
                    return Err(Denied::Partition(arn.partition.clone()));
                }
                Location {
                    region,
                    own_account: home == Some(arn.account.as_str()),
                    account: &arn.account,
                    names: arn.candidate_names(),
                    arn: Some(arn.to_string()),
                }
            }
        };
        self.decide(namespace, &location)
    }

    /// After the call, on what Secrets Manager returned: the canonical ARN and name of the secret it
    /// read, which must be in the region asked, consistent with each other, and allowed.
    pub fn check_resolved(
        &self,
        namespace: &str,
        requested: &SecretId,
        region: &str,
        role: Option<&RoleArn>,
        arn: &SecretArn,
        name: &str,
    ) -> Result<(), Denied> {
        let consistent = arn.resource == name || strip_suffix(&arn.resource) == Some(name);
        if !consistent {
            return Err(Denied::Resolved(arn.to_string()));
        }
        if arn.region != region {
            return Err(Denied::Region(arn.region.clone()));
        }
        if arn.partition != partition_of(region) {
            return Err(Denied::Partition(arn.partition.clone()));
        }
        let own_account = match self.home_account(role) {
            Some(own) => own == arn.account,
            // Unknown own account: only a plain name is known to resolve in it.
            None => matches!(requested, SecretId::Name(_)),
        };
        let location = Location {
            region,
            own_account,
            account: &arn.account,
            names: vec![name],
            arn: Some(arn.to_string()),
        };
        self.decide(namespace, &location)
    }

    fn decide(&self, namespace: &str, location: &Location<'_>) -> Result<(), Denied> {
        if !self.allowed_regions.iter().any(|r| r == location.region) {
            return Err(Denied::Region(location.region.to_string()));
        }
        let (arn_patterns, name_patterns): (Vec<&String>, Vec<&String>) =
            self.patterns.iter().partition(|p| p.starts_with("arn:"));
        if let Some(arn) = &location.arn
            && arn_patterns
                .iter()
                .any(|pattern| glob_matches(pattern, namespace, arn))
        {
            return Ok(());
        }
        if !location.own_account {
            return Err(Denied::Account(location.account.to_string()));
        }
        for name in &location.names {
            if !name_patterns
                .iter()
                .any(|pattern| glob_matches(pattern, namespace, name))
            {
                return Err(Denied::Name(name.to_string()));
            }
        }
        Ok(())
    }
}

/// Whether `{namespace}` in `pattern` could match part of another namespace's name: a namespace
/// is a DNS label (`a-z`, `0-9`, `-`), so unless `{namespace}` stands at an end of the pattern or
/// next to a character no label holds (`/`, `_`, `.`, ...; not `*` or `?`), `team-a`'s
/// `{namespace}-*` also matches `team-a-b-x`, which `team-a-b`'s `{namespace}-*` matches too.
pub fn is_ambiguous(pattern: &str) -> bool {
    const PLACEHOLDER: &str = "{namespace}";
    let could_continue_a_label =
        |c: Option<char>| c.is_some_and(|c| c.is_ascii_alphanumeric() || "-*?".contains(c));
    pattern.match_indices(PLACEHOLDER).any(|(at, _)| {
        could_continue_a_label(pattern[..at].chars().next_back())
            || could_continue_a_label(pattern[at + PLACEHOLDER.len()..].chars().next())
    })
}

/// `*` in `pattern` matches any run of characters and `?` one character (wildmatch);
/// `{namespace}` stands for `namespace`. A namespace is a DNS label and never holds `*` or `?`;
/// one that did would be glob syntax once substituted, so it matches nothing.
fn glob_matches(pattern: &str, namespace: &str, text: &str) -> bool {
    if namespace.contains(['*', '?']) {
        return false;
    }
    wildmatch::WildMatch::new(&pattern.replace("{namespace}", namespace)).matches(text)
}

#[cfg(test)]
mod tests {
    use super::super::id::{parse_arn, parse_secret_id};
    use super::*;

    const OWN: &str = "123456789012";

    #[test]
    fn a_namespace_placeholder_must_be_fenced_off_from_other_names() {
        for fenced in [
            "{namespace}/*",
            "shared/{namespace}/*",
            "{namespace}_*",
            "{namespace}",
            "arn:aws:secretsmanager:*:111111111111:secret:{namespace}/*",
            "arn:aws:iam::111111111111:role/mtls/{namespace}",
            "arn:aws:iam::111111111111:role/mtls/{namespace}/*",
        ] {
            assert!(!is_ambiguous(fenced), "{fenced}");
        }
        for ambiguous in [
            "{namespace}-*",
            "{namespace}*",
            "{namespace}?/*",
            "team-{namespace}/*",
            "*{namespace}/*",
            "arn:aws:iam::111111111111:role/mtls/{namespace}-*",
        ] {
            assert!(is_ambiguous(ambiguous), "{ambiguous}");
        }
        // Why: team-a's pattern matches a name team-a-b's pattern matches too.
        assert!(glob_matches("{namespace}-*", "team-a", "team-a-b-client"));
        assert!(glob_matches("{namespace}-*", "team-a-b", "team-a-b-client"));
        let policy = SourcePolicy::new(
            vec!["{namespace}/*".into(), "{namespace}-*".into()],
            None,
            vec![],
        )
        .with_allowed_roles(vec!["arn:aws:iam::1:role/{namespace}".into()]);
        assert_eq!(policy.ambiguous_patterns(), vec!["{namespace}-*"]);
    }

    #[test]
    fn role_patterns_split_before_each_arn_only() {
        assert_eq!(
            split_role_patterns("arn:aws:iam::1:role/a,b,arn:aws:iam::2:role/{namespace}"),
            vec![
                "arn:aws:iam::1:role/a,b".to_string(),
                "arn:aws:iam::2:role/{namespace}".to_string()
            ],
            "a comma inside a role name stays in it"
        );
        assert_eq!(
            split_role_patterns("arn:aws:iam::1:role/x, arn:aws:iam::1:role/y,"),
            vec![
                "arn:aws:iam::1:role/x".to_string(),
                "arn:aws:iam::1:role/y,".to_string()
            ]
        );
        assert!(split_role_patterns("").is_empty());
    }

    fn policy(patterns: &[&str]) -> SourcePolicy {
        SourcePolicy::new(
            patterns.iter().map(|p| p.to_string()).collect(),
            Some(OWN.into()),
            vec!["eu-west-1".into()],
        )
    }

    fn allows(policy: &SourcePolicy, namespace: &str, id: &str) -> bool {
        parse_secret_id(id).is_ok_and(|id| {
            policy
                .check_request(namespace, &id, "eu-west-1", None)
                .is_ok()
        })
    }

    #[test]
    fn default_allows_only_the_namespace_prefix_in_the_own_account_and_region() {
        let policy = policy(&[]);
        assert!(allows(&policy, "payments", "payments/api-client"));
        assert!(allows(&policy, "payments", "payments/deep/path"));
        assert!(!allows(&policy, "payments", "billing/api-client"));
        assert!(!allows(&policy, "payments", "payments-evil/api-client"));
        assert!(!allows(&policy, "payments", "payments"));
        let own = "arn:aws:secretsmanager:eu-west-1:123456789012:secret:payments/api-client-AbCdEf";
        assert!(allows(&policy, "payments", own));
        let other_tenant =
            "arn:aws:secretsmanager:eu-west-1:123456789012:secret:billing/api-client-AbCdEf";
        assert!(!allows(&policy, "payments", other_tenant));
        let other_account =
            "arn:aws:secretsmanager:eu-west-1:999999999999:secret:payments/x-AbCdEf";
        assert!(!allows(&policy, "payments", other_account));
        let other_region = "arn:aws:secretsmanager:us-east-1:123456789012:secret:payments/x-AbCdEf";
        assert!(!allows(&policy, "payments", other_region));
        let Ok(id) = parse_secret_id("payments/x") else {
            panic!("valid");
        };
        assert_eq!(
            policy.check_request("payments", &id, "us-east-1", None),
            Err(Denied::Region("us-east-1".into()))
        );
    }

    #[test]
    fn the_suffix_cannot_smuggle_a_name_past_a_pattern() {
        // `teams/a/x-client` may be the name `teams/a/x` with suffix `client` in a full ARN.
        let policy = policy(&["teams/{namespace}/*-client"]);
        assert!(allows(&policy, "a", "teams/a/payments-client"));
        assert!(!allows(
            &policy,
            "a",
            "arn:aws:secretsmanager:eu-west-1:123456789012:secret:teams/a/x-client"
        ));
    }

    #[test]
    fn other_accounts_only_through_arn_patterns() {
        let policy = policy(&["arn:aws:secretsmanager:*:111111111111:secret:{namespace}/*"]);
        assert!(allows(
            &policy,
            "a",
            "arn:aws:secretsmanager:eu-west-1:111111111111:secret:a/x-AbCdEf"
        ));
        assert!(!allows(
            &policy,
            "a",
            "arn:aws:secretsmanager:eu-west-1:222222222222:secret:a/x-AbCdEf"
        ));
        assert!(!allows(
            &policy,
            "a",
            "arn:aws:secretsmanager:eu-west-1:111111111111:secret:b/x-AbCdEf"
        ));
        // Unknown own account: ARN ids need an arn: pattern, names still work by name patterns.
        let unknown = SourcePolicy::new(vec![], None, vec!["eu-west-1".into()]);
        assert!(allows(&unknown, "a", "a/x"));
        assert!(!allows(
            &unknown,
            "a",
            "arn:aws:secretsmanager:eu-west-1:123456789012:secret:a/x-AbCdEf"
        ));
    }

    #[test]
    fn resolved_arn_and_name_are_checked_again() -> Result<(), super::super::id::IdError> {
        let policy = policy(&[]);
        let requested = parse_secret_id("payments/x")?;
        let arn = |resource: &str| {
            parse_arn(&format!(
                "arn:aws:secretsmanager:eu-west-1:123456789012:secret:{resource}"
            ))
        };
        let good = arn("payments/x-AbCdEf")?;
        assert_eq!(
            policy.check_resolved(
                "payments",
                &requested,
                "eu-west-1",
                None,
                &good,
                "payments/x"
            ),
            Ok(())
        );
        let foreign = arn("billing/api-client-AbCdEf")?;
        assert!(
            policy
                .check_resolved(
                    "payments",
                    &requested,
                    "eu-west-1",
                    None,
                    &foreign,
                    "billing/api-client"
                )
                .is_err()
        );
        // The name must be the ARN's: a lying name is refused.
        assert!(
            policy
                .check_resolved(
                    "payments",
                    &requested,
                    "eu-west-1",
                    None,
                    &foreign,
                    "payments/x"
                )
                .is_err()
        );
        let elsewhere =
            parse_arn("arn:aws:secretsmanager:eu-west-1:999999999999:secret:payments/x-AbCdEf")?;
        assert!(
            policy
                .check_resolved(
                    "payments",
                    &requested,
                    "eu-west-1",
                    None,
                    &elsewhere,
                    "payments/x"
                )
                .is_err()
        );
        // The same account's digits in another partition are another account.
        let other_partition =
            parse_arn("arn:aws-cn:secretsmanager:eu-west-1:123456789012:secret:payments/x-AbCdEf")?;
        assert_eq!(
            policy.check_resolved(
                "payments",
                &requested,
                "eu-west-1",
                None,
                &other_partition,
                "payments/x"
            ),
            Err(Denied::Partition("aws-cn".into()))
        );
        let asked = SecretId::Arn(other_partition);
        assert_eq!(
            policy.check_request("payments", &asked, "eu-west-1", None),
            Err(Denied::Partition("aws-cn".into()))
        );
        assert_eq!(super::super::id::partition_of("cn-north-1"), "aws-cn");
        assert_eq!(
            super::super::id::partition_of("us-gov-west-1"),
            "aws-us-gov"
        );
        assert_eq!(super::super::id::partition_of("eu-west-1"), "aws");
        Ok(())
    }

    #[test]
    fn roles_only_through_a_pattern_for_the_namespace() -> Result<(), super::super::id::IdError> {
        use super::super::id::parse_role_arn;
        let payments_role = parse_role_arn("arn:aws:iam::111111111111:role/mtls/payments")?;
        let billing_role = parse_role_arn("arn:aws:iam::111111111111:role/mtls/billing")?;
        // Default: no role for anyone.
        assert!(policy(&[]).check_role("payments", &payments_role).is_err());
        let policy = policy(&[]).with_allowed_roles(vec![
            "arn:aws:iam::111111111111:role/mtls/{namespace}".into(),
        ]);
        assert_eq!(policy.check_role("payments", &payments_role), Ok(()));
        assert_eq!(
            policy.check_role("payments", &billing_role),
            Err(Denied::Role(billing_role.to_string()))
        );
        // Through the role, names resolve in its account and name patterns apply there.
        let name = parse_secret_id("payments/x")?;
        let role = Some(&payments_role);
        assert_eq!(
            policy.check_request("payments", &name, "eu-west-1", role),
            Ok(())
        );
        assert!(
            policy
                .check_request(
                    "payments",
                    &parse_secret_id("billing/x")?,
                    "eu-west-1",
                    role
                )
                .is_err()
        );
        let in_role_account =
            parse_secret_id("arn:aws:secretsmanager:eu-west-1:111111111111:secret:payments/x")?;
        assert_eq!(
            policy.check_request("payments", &in_role_account, "eu-west-1", role),
            Ok(())
        );
        // Without the role, the same ARN is another account's.
        assert!(
            policy
                .check_request("payments", &in_role_account, "eu-west-1", None)
                .is_err()
        );
        // Through the role, the operator's own account is a third account.
        let own =
            parse_secret_id("arn:aws:secretsmanager:eu-west-1:123456789012:secret:payments/x")?;
        assert!(
            policy
                .check_request("payments", &own, "eu-west-1", role)
                .is_err()
        );
        // The answer is checked against the role's account too.
        let resolved =
            parse_arn("arn:aws:secretsmanager:eu-west-1:111111111111:secret:payments/x-AbCdEf")?;
        assert_eq!(
            policy.check_resolved(
                "payments",
                &name,
                "eu-west-1",
                role,
                &resolved,
                "payments/x"
            ),
            Ok(())
        );
        assert!(
            policy
                .check_resolved(
                    "payments",
                    &name,
                    "eu-west-1",
                    None,
                    &resolved,
                    "payments/x"
                )
                .is_err()
        );
        Ok(())
    }

    #[test]
    fn glob_edge_cases_and_no_escape_through_the_namespace() {
        assert!(glob_matches("abc", "", "abc"));
        assert!(!glob_matches("abc", "", "abcd"));
        assert!(glob_matches("a*c", "", "ac"));
        assert!(glob_matches("a*b*c", "", "a-b-c"));
        assert!(!glob_matches("a*b*c", "", "a-c"));
        assert!(glob_matches("*", "", ""));
        assert!(!glob_matches("ab*ba", "", "aba"));
        assert!(glob_matches("team-?/*", "", "team-a/x"));
        // A namespace never acts as glob syntax: one that held it matches nothing.
        assert!(!glob_matches("{namespace}/*", "*", "billing/x"));
        assert!(!glob_matches("{namespace}/*", "*", "*/x"));
        assert!(!glob_matches("{namespace}/*", "?", "a/x"));
    }
}

#[cfg(test)]
mod properties {
    use proptest::prelude::*;

    use super::super::id::{SecretId, is_valid_name, parse_secret_id, strip_suffix};
    use super::*;

    /// Every name Secrets Manager could resolve an id to (a plain name is itself; an ARN's resource
    /// is the name, or the name plus a suffix).
    fn resolutions(id: &SecretId) -> Vec<String> {
        match id {
            SecretId::Name(name) => vec![name.clone()],
            SecretId::Arn(arn) => {
                let mut names = vec![arn.resource.clone()];
                names.extend(strip_suffix(&arn.resource).map(str::to_string));
                names
            }
        }
    }

    fn name_part() -> impl Strategy<Value = String> {
        prop_oneof![
            "[a-z]{1,3}",
            Just("payments".to_string()),
            Just("billing".to_string()),
            "[A-Za-z0-9/_+=.@*?{}:-]{0,12}",
        ]
    }

    /// ARNs whose resource reads as two names, with and without what looks like Secrets Manager's
    /// six-character suffix: `shared/a-client` is also `shared/a` plus the suffix `client`. Under
    /// `shared/*-client` one reading is allowed and the other is not: the smuggling case.
    fn suffixed_arns() -> impl Strategy<Value = String> {
        let prefix = prop_oneof![Just("payments"), Just("billing"), Just("shared")];
        let suffix = prop_oneof![Just("client".to_string()), "[A-Za-z0-9]{6}"];
        (prefix, "[a-z]{1,4}", suffix).prop_map(|(prefix, name, suffix)| {
            format!("arn:aws:secretsmanager:eu-west-1:123456789012:secret:{prefix}/{name}-{suffix}")
        })
    }

    fn ids() -> impl Strategy<Value = String> {
        let account = prop_oneof![
            Just("123456789012".to_string()),
            Just("999999999999".to_string()),
            "[0-9]{10,13}"
        ];
        let region = prop_oneof![
            Just("eu-west-1".to_string()),
            Just("us-east-1".to_string()),
            "[a-z-]{2,10}[0-9]"
        ];
        let name =
            || (name_part(), name_part(), name_part()).prop_map(|(a, b, c)| format!("{a}/{b}{c}"));
        prop_oneof![
            name(),
            (region, account, name()).prop_map(|(region, account, name)| format!(
                "arn:aws:secretsmanager:{region}:{account}:secret:{name}"
            )),
            suffixed_arns(),
        ]
    }

    /// Every id the policy allows resolves only to names under an allowed pattern, and an id one of
    /// whose readings is not allowed is refused. Counts how many cases reached each assertion, so
    /// the property cannot pass by never generating what it is about.
    #[test]
    fn allowed_ids_resolve_only_under_an_allowed_pattern() {
        use std::sync::atomic::{AtomicU64, Ordering};
        let patterns = vec!["{namespace}/*".to_string(), "shared/*-client".to_string()];
        let policy = SourcePolicy::new(
            patterns.clone(),
            Some("123456789012".into()),
            vec!["eu-west-1".into()],
        );
        let (allowed, mixed) = (AtomicU64::new(0), AtomicU64::new(0));
        let namespaces = prop_oneof![Just("payments"), Just("billing"), Just("a")];
        let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig {
            cases: 2_000,
            ..ProptestConfig::default()
        });
        let outcome = runner.run(&(ids(), namespaces), |(id, namespace)| {
            let Ok(parsed) = parse_secret_id(&id) else {
                return Ok(());
            };
            let decision = policy.check_request(namespace, &parsed, "eu-west-1", None);
            let names = resolutions(&parsed);
            let matching = names
                .iter()
                .filter(|name| patterns.iter().any(|p| glob_matches(p, namespace, name)))
                .count();
            if matching > 0 && matching < names.len() {
                mixed.fetch_add(1, Ordering::Relaxed);
                prop_assert!(
                    decision.is_err(),
                    "{id} in {namespace}: one reading smuggled"
                );
            }
            if decision.is_ok() {
                allowed.fetch_add(1, Ordering::Relaxed);
                for name in &names {
                    prop_assert!(is_valid_name(name));
                    prop_assert!(matching == names.len(), "{id} resolves to {name}");
                }
                if let SecretId::Arn(arn) = &parsed {
                    prop_assert_eq!(arn.account.as_str(), "123456789012");
                    prop_assert_eq!(arn.region.as_str(), "eu-west-1");
                }
            }
            Ok(())
        });
        if let Err(failure) = outcome {
            panic!("{failure}");
        }
        // About a third of the cases are suffixed ARNs; of those, `shared/...-client` in any
        // namespace is the smuggling case, and every `{namespace}/...` one is allowed.
        let (allowed, mixed) = (allowed.into_inner(), mixed.into_inner());
        assert!(allowed >= 100, "only {allowed} of 2000 cases were allowed");
        assert!(
            mixed >= 50,
            "only {mixed} of 2000 cases were the smuggling case"
        );
    }
}
