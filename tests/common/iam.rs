//! A small IAM evaluator for the endpoint: the shipped example policies' Allow statements, with
//! `${aws:PrincipalTag/KEY}` taken from the calling session's tags, `*` and `?` in actions and
//! resources. Enough to hold the operator's calls to what AWS would allow them under those
//! policies (moto does not evaluate session tags); not a general IAM engine: conditions and Deny
//! statements are not read, and a statement with either is refused by [`Policy::parse`].

use std::collections::BTreeMap;

use anyhow::{Result, bail};

/// The Allow statements of one policy document.
#[derive(Debug, Clone)]
pub struct Policy {
    statements: Vec<Statement>,
}

#[derive(Debug, Clone)]
struct Statement {
    actions: Vec<String>,
    resources: Vec<String>,
}

impl Policy {
    /// Reads a policy document; statements with a Condition count only for actions outside
    /// Secrets Manager (`kms:`), which the endpoint never sees.
    pub fn parse(text: &str) -> Result<Self> {
        let document: serde_json::Value = serde_json::from_str(text)?;
        let mut statements = Vec::new();
        for statement in document["Statement"].as_array().into_iter().flatten() {
            if statement["Effect"] != "Allow" {
                bail!("only Allow statements are evaluated here: {statement}");
            }
            let list = |value: &serde_json::Value| -> Vec<String> {
                match value {
                    serde_json::Value::String(one) => vec![one.clone()],
                    serde_json::Value::Array(many) => many
                        .iter()
                        .filter_map(|item| item.as_str().map(str::to_string))
                        .collect(),
                    _ => Vec::new(),
                }
            };
            let actions = list(&statement["Action"]);
            if statement.get("Condition").is_some()
                && actions
                    .iter()
                    .any(|action| action.starts_with("secretsmanager:"))
            {
                bail!("conditions on Secrets Manager actions are not evaluated here: {statement}");
            }
            statements.push(Statement {
                actions,
                resources: list(&statement["Resource"]),
            });
        }
        Ok(Self { statements })
    }

    /// Whether a caller with session `tags` may perform `action` on `resource`.
    pub fn allows(&self, tags: &BTreeMap<String, String>, action: &str, resource: &str) -> bool {
        self.statements.iter().any(|statement| {
            statement
                .actions
                .iter()
                .any(|pattern| glob(pattern, action))
                && statement.resources.iter().any(|pattern| {
                    substitute(pattern, tags).is_some_and(|pattern| glob(&pattern, resource))
                })
        })
    }
}

/// `pattern` with each `${aws:PrincipalTag/KEY}` replaced by the tag's value; `None` when the
/// session lacks the tag (IAM then does not match the statement).
fn substitute(pattern: &str, tags: &BTreeMap<String, String>) -> Option<String> {
    let mut out = String::new();
    let mut rest = pattern;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let end = rest[start..].find('}')? + start;
        let variable = &rest[start + 2..end];
        let key = variable.strip_prefix("aws:PrincipalTag/")?;
        out.push_str(tags.get(key)?);
        rest = &rest[end + 1..];
    }
    out.push_str(rest);
    Some(out)
}

/// IAM's wildcard match: `*` any run of characters, `?` any one.
fn glob(pattern: &str, text: &str) -> bool {
    let (pattern, text): (Vec<char>, Vec<char>) =
        (pattern.chars().collect(), text.chars().collect());
    let (mut p, mut t, mut star, mut mark) = (0, 0, None, 0);
    while t < text.len() {
        if p < pattern.len() && (pattern[p] == '?' || pattern[p] == text[t]) {
            p += 1;
            t += 1;
        } else if p < pattern.len() && pattern[p] == '*' {
            star = Some(p);
            mark = t;
            p += 1;
        } else if let Some(at) = star {
            p = at + 1;
            mark += 1;
            t = mark;
        } else {
            return false;
        }
    }
    pattern[p..].iter().all(|c| *c == '*')
}
