//! Tenancy: which Secrets Manager secrets an identity in a namespace may read through the operator's
//! IAM role. Decided before any AWS call.
//!
//! A pattern is a glob (`*` matches any run of characters, `/` included) with a `{namespace}`
//! placeholder. The secure default is `{namespace}/*`: a namespace reads only secrets named under its
//! own prefix. For an ARN, patterns that do not start with `arn:` are matched against the secret name
//! in it (the part after `:secret:`, which on AWS carries a 6-character suffix).

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourcePolicy {
    patterns: Vec<String>,
}

pub const DEFAULT_PATTERN: &str = "{namespace}/*";

impl Default for SourcePolicy {
    fn default() -> Self {
        Self {
            patterns: vec![DEFAULT_PATTERN.to_string()],
        }
    }
}

impl SourcePolicy {
    pub fn from_patterns(patterns: Vec<String>) -> Self {
        if patterns.is_empty() {
            Self::default()
        } else {
            Self { patterns }
        }
    }

    pub fn allow_all() -> Self {
        Self {
            patterns: vec!["*".to_string()],
        }
    }

    pub fn patterns(&self) -> &[String] {
        &self.patterns
    }

    pub fn allows(&self, namespace: &str, secret_id: &str) -> bool {
        let name = secret_id
            .strip_prefix("arn:")
            .and_then(|rest| rest.split_once(":secret:"))
            .map_or(secret_id, |(_, name)| name);
        self.patterns.iter().any(|pattern| {
            let pattern = pattern.replace("{namespace}", namespace);
            let subject = if pattern.starts_with("arn:") {
                secret_id
            } else {
                name
            };
            glob_matches(&pattern, subject)
        })
    }
}

/// `*` matches any run of characters; everything else matches itself.
fn glob_matches(pattern: &str, text: &str) -> bool {
    let mut parts = pattern.split('*');
    let Some(first) = parts.next() else {
        return text.is_empty();
    };
    let Some(mut rest) = text.strip_prefix(first) else {
        return false;
    };
    let parts: Vec<&str> = parts.collect();
    let Some((last, middle)) = parts.split_last() else {
        // No `*` at all: the whole text must equal the pattern.
        return rest.is_empty();
    };
    for part in middle {
        match rest.find(part) {
            Some(index) => rest = &rest[index + part.len()..],
            None => return false,
        }
    }
    rest.len() >= last.len() && rest.ends_with(last)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_allows_only_the_namespace_prefix() {
        let policy = SourcePolicy::default();
        assert!(policy.allows("payments", "payments/api-client"));
        assert!(policy.allows("payments", "payments/deep/path"));
        assert!(!policy.allows("payments", "billing/api-client"));
        assert!(!policy.allows("payments", "payments-evil/api-client"));
        assert!(!policy.allows("payments", "payments"));
        assert!(policy.allows(
            "payments",
            "arn:aws:secretsmanager:eu-west-1:123456789012:secret:payments/api-client-AbCdEf"
        ));
        assert!(!policy.allows(
            "payments",
            "arn:aws:secretsmanager:eu-west-1:123456789012:secret:billing/api-client-AbCdEf"
        ));
    }

    #[test]
    fn patterns_and_allow_all() {
        let policy = SourcePolicy::from_patterns(vec![
            "shared/certs/*".into(),
            "teams/{namespace}/*-client".into(),
            "arn:aws:secretsmanager:*:111111111111:secret:{namespace}/*".into(),
        ]);
        assert!(policy.allows("a", "shared/certs/x"));
        assert!(policy.allows("a", "teams/a/payments-client"));
        assert!(!policy.allows("a", "teams/b/payments-client"));
        assert!(!policy.allows("a", "teams/a/payments-server"));
        assert!(policy.allows(
            "a",
            "arn:aws:secretsmanager:eu-west-1:111111111111:secret:a/x-AbCdEf"
        ));
        assert!(!policy.allows(
            "a",
            "arn:aws:secretsmanager:eu-west-1:222222222222:secret:b/x-AbCdEf"
        ));
        assert!(SourcePolicy::allow_all().allows("a", "anything/at/all"));
        assert_eq!(SourcePolicy::from_patterns(vec![]), SourcePolicy::default());
    }

    #[test]
    fn glob_edge_cases() {
        assert!(glob_matches("abc", "abc"));
        assert!(!glob_matches("abc", "abcd"));
        assert!(glob_matches("a*c", "ac"));
        assert!(glob_matches("a*b*c", "a-b-c"));
        assert!(!glob_matches("a*b*c", "a-c"));
        assert!(glob_matches("*", ""));
        assert!(!glob_matches("ab*ba", "aba"));
    }
}
