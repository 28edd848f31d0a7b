//! What `spoke check` reports: problems with a line, a severity, the rule
//! they break, a message that says what is wrong and a hint that says how to
//! fix it.

use std::fmt;

/// How bad a problem is. Errors make a manifest invalid (`spoke check` exits
/// 1, the hub and agents refuse it); warnings are printed and allowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Error,
    Warning,
}

impl Severity {
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Error => "error",
            Severity::Warning => "warning",
        }
    }
}

/// The rule a problem breaks; its name is stable (it is in `--json` output
/// and CI scripts may match on it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Rule {
    /// The file cannot be read.
    Read,
    /// TOML syntax, unknown keys, values of the wrong TOML type.
    Syntax,
    /// Service, dataset, field and path names.
    Name,
    /// Every dataset has exactly one owner, a declared service.
    Owner,
    /// A dataset's key, fields, types, schema version and tombstone horizon.
    Schema,
    /// A subscription names a declared consumer and dataset.
    Reference,
    /// A subscription's projection: fields the dataset has, each once.
    Projection,
    /// A service never subscribes to its own dataset.
    SelfSubscription,
    /// One subscription per consumer and dataset.
    DuplicateSubscription,
    /// Consumers read only the owner's feed: no copy of a copy, no
    /// re-published copy.
    CopyOfCopy,
    /// No cycles: datasets do not derive from themselves, feeds do not loop.
    Cycle,
    /// `derived_from` names declared datasets the owner really reads.
    Lineage,
    /// Private fields leave the owner only for services it granted them to.
    PrivateField,
    /// `private`, `grants` name fields and services that exist.
    Grant,
    /// A strategy and its settings (`interval`, `ttl`, `staleness_budget`).
    Strategy,
    /// The strategy can meet the staleness budget.
    Budget,
    /// Data the owner marks must-be-current is never copied.
    MustBeCurrent,
    /// Large fields in copies; declared sizes.
    LargeField,
    /// Per-field decision traits (`traits`).
    Traits,
    /// Request paths (`[paths.*]`).
    Path,
    /// Service availability.
    Availability,
    /// `[policy]` settings.
    Policy,
}

impl Rule {
    pub fn as_str(self) -> &'static str {
        match self {
            Rule::Read => "read",
            Rule::Syntax => "syntax",
            Rule::Name => "name",
            Rule::Owner => "owner",
            Rule::Schema => "schema",
            Rule::Reference => "reference",
            Rule::Projection => "projection",
            Rule::SelfSubscription => "self-subscription",
            Rule::DuplicateSubscription => "duplicate-subscription",
            Rule::CopyOfCopy => "copy-of-copy",
            Rule::Cycle => "cycle",
            Rule::Lineage => "lineage",
            Rule::PrivateField => "private-field",
            Rule::Grant => "grant",
            Rule::Strategy => "strategy",
            Rule::Budget => "budget",
            Rule::MustBeCurrent => "must-be-current",
            Rule::LargeField => "large-field",
            Rule::Traits => "traits",
            Rule::Path => "path",
            Rule::Availability => "availability",
            Rule::Policy => "policy",
        }
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One problem, at a line of the manifest (1-based; 0 when unknown).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Problem {
    pub line: usize,
    pub severity: Severity,
    pub rule: Rule,
    /// What is wrong, naming the services, datasets and fields involved.
    pub message: String,
    /// How to fix it.
    pub hint: String,
}

impl Problem {
    pub fn error(
        line: usize,
        rule: Rule,
        message: impl Into<String>,
        hint: impl Into<String>,
    ) -> Self {
        Problem {
            line,
            severity: Severity::Error,
            rule,
            message: message.into(),
            hint: hint.into(),
        }
    }

    pub fn warning(
        line: usize,
        rule: Rule,
        message: impl Into<String>,
        hint: impl Into<String>,
    ) -> Self {
        Problem {
            severity: Severity::Warning,
            ..Problem::error(line, rule, message, hint)
        }
    }

    pub fn is_error(&self) -> bool {
        self.severity == Severity::Error
    }

    /// The one-line form `spoke check` prints:
    /// `file:line: message (fix: hint)`, with `warning: ` before the message
    /// of a warning.
    pub fn render(&self, file: &str) -> String {
        let mut out = format!("{file}:{}: ", self.line);
        if self.severity == Severity::Warning {
            out.push_str("warning: ");
        }
        out.push_str(&self.message);
        if !self.hint.is_empty() {
            out.push_str(" (fix: ");
            out.push_str(&self.hint);
            out.push(')');
        }
        out
    }
}

/// Every problem found in one manifest file that has at least one error
/// (warnings found beside the errors are included).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManifestError {
    pub file: String,
    pub problems: Vec<Problem>,
}

impl ManifestError {
    pub fn errors(&self) -> impl Iterator<Item = &Problem> {
        self.problems.iter().filter(|p| p.is_error())
    }
}

impl fmt::Display for ManifestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.problems.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            f.write_str(&p.render(&self.file))?;
        }
        Ok(())
    }
}

impl std::error::Error for ManifestError {}
