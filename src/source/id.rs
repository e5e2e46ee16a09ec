//! Strict parsing of Secrets Manager secret ids: a name, or a well-formed secret ARN. Anything else is
//! refused before any call, so the tenancy policy and Secrets Manager never disagree about which
//! secret an id names (an id such as `arn:...:secret:payments/x:billing/y` is neither).

use std::fmt;

/// Longest secret name Secrets Manager accepts.
pub const MAX_NAME_LEN: usize = 512;
/// Length of the random suffix Secrets Manager appends to a name in an ARN (`-AbCdEf`).
const SUFFIX_LEN: usize = 6;
/// AWS partitions that have Secrets Manager.
const PARTITIONS: &[&str] = &[
    "aws",
    "aws-cn",
    "aws-us-gov",
    "aws-iso",
    "aws-iso-b",
    "aws-iso-e",
    "aws-iso-f",
    "aws-eusc",
];

/// A parsed secret id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SecretId {
    /// A plain name: the secret lives in the operator's own account, in the region asked.
    Name(String),
    Arn(SecretArn),
}

/// `arn:PARTITION:secretsmanager:REGION:ACCOUNT:secret:RESOURCE`. In a full ARN, RESOURCE is the
/// name followed by `-` and a 6-character suffix; in a partial ARN it is the name alone.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SecretArn {
    pub partition: String,
    pub region: String,
    pub account: String,
    pub resource: String,
}

impl SecretArn {
    /// The names Secrets Manager could resolve this ARN to: the resource itself (a partial ARN), and
    /// the resource without its suffix when it ends like one (a full ARN). A policy must allow all.
    pub fn candidate_names(&self) -> Vec<&str> {
        let mut names = vec![self.resource.as_str()];
        if let Some(name) = strip_suffix(&self.resource) {
            names.push(name);
        }
        names
    }
}

impl fmt::Display for SecretArn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "arn:{}:secretsmanager:{}:{}:secret:{}",
            self.partition, self.region, self.account, self.resource
        )
    }
}

/// Why an id was refused; the message says what a valid id looks like, never more.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error(
        "{0:?} is not a Secrets Manager secret name (1-512 characters of A-Z a-z 0-9 / _ + = . @ -)"
    )]
    BadName(String),
    #[error(
        "{0:?} is not a Secrets Manager secret ARN \
         (arn:PARTITION:secretsmanager:REGION:ACCOUNT:secret:NAME, with a 12-digit account)"
    )]
    BadArn(String),
    #[error("{0:?} is not an AWS region name (such as eu-west-1)")]
    BadRegion(String),
    #[error(
        "{0:?} is not an IAM role ARN (arn:PARTITION:iam::ACCOUNT:role/[PATH/]NAME, with a 12-digit \
         account)"
    )]
    BadRoleArn(String),
}

/// `arn:PARTITION:iam::ACCOUNT:role/PATH/NAME`: a role the operator may assume to read a secret in
/// another account.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RoleArn {
    pub partition: String,
    pub account: String,
    /// `PATH/NAME` after `role/`.
    pub resource: String,
}

impl fmt::Display for RoleArn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "arn:{}:iam::{}:role/{}",
            self.partition, self.account, self.resource
        )
    }
}

/// Longest role path plus name IAM accepts (a 512-character path and a 64-character name).
const MAX_ROLE_RESOURCE_LEN: usize = 576;

/// Parses a role ARN strictly: a known partition, service `iam`, no region, a 12-digit account,
/// `role/` and a path and name of IAM's characters, without empty segments.
pub fn parse_role_arn(text: &str) -> Result<RoleArn, IdError> {
    let bad = || IdError::BadRoleArn(shorten(text));
    let fields: Vec<&str> = text.splitn(6, ':').collect();
    let [arn, partition, service, region, account, resource] = fields.as_slice() else {
        return Err(bad());
    };
    let Some(resource) = resource.strip_prefix("role/") else {
        return Err(bad());
    };
    let well_formed = *arn == "arn"
        && PARTITIONS.contains(partition)
        && *service == "iam"
        && region.is_empty()
        && account.len() == 12
        && account.bytes().all(|b| b.is_ascii_digit())
        && (1..=MAX_ROLE_RESOURCE_LEN).contains(&resource.len())
        && resource.split('/').all(|segment| !segment.is_empty())
        && resource
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/_+=,.@-".contains(&b));
    if !well_formed {
        return Err(bad());
    }
    Ok(RoleArn {
        partition: partition.to_string(),
        account: account.to_string(),
        resource: resource.to_string(),
    })
}

/// Parses an id as written in `spec.source.secretId` or `caSecretId`.
pub fn parse_secret_id(text: &str) -> Result<SecretId, IdError> {
    if text.starts_with("arn:") {
        parse_arn(text).map(SecretId::Arn)
    } else if is_valid_name(text) {
        Ok(SecretId::Name(text.to_string()))
    } else {
        Err(IdError::BadName(shorten(text)))
    }
}

/// Parses a secret ARN strictly: seven fields, a known partition, service `secretsmanager`, a valid
/// region, a 12-digit account, resource type `secret`, a valid name.
pub fn parse_arn(text: &str) -> Result<SecretArn, IdError> {
    let bad = || IdError::BadArn(shorten(text));
    let fields: Vec<&str> = text.splitn(7, ':').collect();
    let [arn, partition, service, region, account, kind, resource] = fields.as_slice() else {
        return Err(bad());
    };
    let well_formed = *arn == "arn"
        && PARTITIONS.contains(partition)
        && *service == "secretsmanager"
        && is_valid_region(region)
        && account.len() == 12
        && account.bytes().all(|b| b.is_ascii_digit())
        && *kind == "secret"
        && is_valid_name(resource);
    if !well_formed {
        return Err(bad());
    }
    Ok(SecretArn {
        partition: partition.to_string(),
        region: region.to_string(),
        account: account.to_string(),
        resource: resource.to_string(),
    })
}

/// Secrets Manager's name rule: 1 to 512 of ASCII letters, digits and `/_+=.@-`.
pub fn is_valid_name(name: &str) -> bool {
    (1..=MAX_NAME_LEN).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/_+=.@-".contains(&b))
}

/// An AWS region name: `xx-word-N` or `xx-word-word-N` (e.g. `eu-west-1`, `us-gov-west-1`).
/// The partition whose endpoints serve `region` (`cn-north-1`: `aws-cn`, `us-gov-west-1`:
/// `aws-us-gov`, ...; `aws` for the commercial regions).
pub fn partition_of(region: &str) -> &'static str {
    const BY_PREFIX: &[(&str, &str)] = &[
        ("cn-", "aws-cn"),
        ("us-gov-", "aws-us-gov"),
        ("us-isob-", "aws-iso-b"),
        ("us-isof-", "aws-iso-f"),
        ("us-iso-", "aws-iso"),
        ("eu-isoe-", "aws-iso-e"),
        ("eusc-", "aws-eusc"),
    ];
    BY_PREFIX
        .iter()
        .find(|(prefix, _)| region.starts_with(prefix))
        .map_or("aws", |(_, partition)| partition)
}

pub fn is_valid_region(region: &str) -> bool {
    let parts: Vec<&str> = region.split('-').collect();
    let Some((number, words)) = parts.split_last() else {
        return false;
    };
    region.len() <= 32
        && words.len() >= 2
        && words[0].len() == 2
        && words
            .iter()
            .all(|w| !w.is_empty() && w.bytes().all(|b| b.is_ascii_lowercase()))
        && (1..=2).contains(&number.len())
        && number.bytes().all(|b| b.is_ascii_digit())
}

/// Checks a region given in a spec.
pub fn parse_region(region: &str) -> Result<&str, IdError> {
    if is_valid_region(region) {
        Ok(region)
    } else {
        Err(IdError::BadRegion(shorten(region)))
    }
}

/// The name without a trailing `-XXXXXX` suffix, when it has one.
pub fn strip_suffix(resource: &str) -> Option<&str> {
    let split = resource.len().checked_sub(SUFFIX_LEN + 1)?;
    let (name, suffix) = resource.split_at(split);
    let suffix = suffix.strip_prefix('-')?;
    (!name.is_empty() && suffix.bytes().all(|b| b.is_ascii_alphanumeric())).then_some(name)
}

/// Ids in error messages are the user's own input, but bounded.
fn shorten(text: &str) -> String {
    text.chars().take(128).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_arns_parse_strictly() {
        assert_eq!(
            parse_secret_id("payments/api-client"),
            Ok(SecretId::Name("payments/api-client".into()))
        );
        let arn = "arn:aws:secretsmanager:eu-west-1:123456789012:secret:payments/x-AbCdEf";
        let Ok(SecretId::Arn(parsed)) = parse_secret_id(arn) else {
            panic!("{arn} should parse");
        };
        assert_eq!(parsed.account, "123456789012");
        assert_eq!(parsed.region, "eu-west-1");
        assert_eq!(parsed.to_string(), arn);
        assert_eq!(
            parsed.candidate_names(),
            vec!["payments/x-AbCdEf", "payments/x"]
        );
        let refused = [
            // The confusion attack: a colon inside the resource.
            "arn:aws:secretsmanager:us-east-1:123456789012:secret:payments/x:billing/api-client",
            "arn:aws:secretsmanager:us-east-1:123456789012:secret:",
            "arn:aws:secretsmanager:us-east-1:12345678901:secret:payments/x",
            "arn:aws:secretsmanager:us-east-1:123456789012:parameter:payments/x",
            "arn:aws:ssm:us-east-1:123456789012:secret:payments/x",
            "arn:evil:secretsmanager:us-east-1:123456789012:secret:payments/x",
            "arn:aws:secretsmanager:US-EAST-1:123456789012:secret:payments/x",
            "arn:aws:secretsmanager::123456789012:secret:payments/x",
            "arn:aws:secretsmanager:us-east-1::secret:payments/x",
            "arn:aws:secretsmanager:us-east-1:123456789012:secret:payments/*",
            "payments/*",
            "payments/?",
            "payments/{namespace}",
            "payments/x:billing/y",
            "payments/ x",
            "",
        ];
        for id in refused {
            assert!(parse_secret_id(id).is_err(), "{id} must be refused");
        }
        assert!(parse_secret_id(&"a".repeat(513)).is_err());
        assert!(parse_secret_id(&"a".repeat(512)).is_ok());
    }

    #[test]
    fn role_arns_parse_strictly() {
        let arn = "arn:aws:iam::111122223333:role/tenants/payments-reader";
        let Ok(parsed) = parse_role_arn(arn) else {
            panic!("{arn} should parse");
        };
        assert_eq!(parsed.account, "111122223333");
        assert_eq!(parsed.resource, "tenants/payments-reader");
        assert_eq!(parsed.to_string(), arn);
        for bad in [
            "arn:aws:iam::111122223333:role/",
            "arn:aws:iam::111122223333:role//x",
            "arn:aws:iam::111122223333:role/x/",
            "arn:aws:iam::111122223333:user/x",
            "arn:aws:iam:eu-west-1:111122223333:role/x",
            "arn:aws:iam::11112222333:role/x",
            "arn:aws:sts::111122223333:role/x",
            "arn:evil:iam::111122223333:role/x",
            "arn:aws:iam::111122223333:role/x*",
            "arn:aws:iam::111122223333:role/x:y",
            "arn:aws:iam::111122223333:role/{namespace}",
            "",
        ] {
            assert!(parse_role_arn(bad).is_err(), "{bad} must be refused");
        }
    }

    #[test]
    fn regions() {
        for good in [
            "eu-west-1",
            "us-gov-west-1",
            "ap-southeast-4",
            "il-central-1",
        ] {
            assert!(is_valid_region(good), "{good}");
        }
        for bad in [
            "",
            "eu",
            "eu-west",
            "EU-west-1",
            "eu-west-1a",
            "e-west-1",
            "eu--1",
            "eu-west-123",
            "../x",
            "eu-west-1/..",
        ] {
            assert!(!is_valid_region(bad), "{bad}");
        }
    }

    #[test]
    fn suffixes() {
        assert_eq!(strip_suffix("payments/x-AbCdEf"), Some("payments/x"));
        assert_eq!(strip_suffix("payments/x"), None);
        assert_eq!(strip_suffix("-AbCdEf"), None);
        assert_eq!(strip_suffix("a-Ab_dEf"), None);
    }
}
