//! The original tool's options, their defaults and validation. Settings are read as GUCs
//! `cube_dispatcher.<job>.<option>` with `cube_dispatcher.<option>` as the default for every job;
//! this module only sees the resulting strings, so it is tested without a server.

use crate::mode::Mode;
use thiserror::Error;

/// Options in the order they are read and shown. Names are the original's ini keys.
pub const OPTIONS: &[&str] = &[
    "src_db",
    "dst_db",
    "pgq_queue_name",
    "pgq_consumer_id",
    "mode",
    "dateformat",
    "part_template",
    "loop_delay",
    "connection_lifetime",
    "log_level",
    "on_error",
    "tables",
    "lock_timeout",
];

/// What a batch that fails because of its events does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnError {
    /// The original's way: roll back, wait, try the same batch again until the cause is fixed.
    Retry,
    /// Write the good events, park the failing ones in cube_dispatcher.dead_letter, finish.
    DeadLetter,
}

impl OnError {
    pub fn parse(s: &str) -> Option<OnError> {
        match s {
            "retry" => Some(OnError::Retry),
            "dead_letter" => Some(OnError::DeadLetter),
            _ => None,
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            OnError::Retry => "retry",
            OnError::DeadLetter => "dead_letter",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum LogLevel {
    Quiet,
    Normal,
    Verbose,
}

impl LogLevel {
    pub fn parse(s: &str) -> Option<LogLevel> {
        match s {
            "quiet" => Some(LogLevel::Quiet),
            "normal" => Some(LogLevel::Normal),
            "verbose" => Some(LogLevel::Verbose),
            _ => None,
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            LogLevel::Quiet => "quiet",
            LogLevel::Normal => "normal",
            LogLevel::Verbose => "verbose",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct JobConfig {
    pub job_name: String,
    pub src_db: String,
    pub pgq_queue_name: String,
    pub pgq_consumer_id: String,
    pub mode: Mode,
    /// None: partitioning off (dateformat explicitly set to '').
    pub dateformat: Option<String>,
    /// None: the mode's default template. Some(""): a missing table is an error.
    pub part_template: Option<String>,
    pub loop_delay: f64,
    pub connection_lifetime: f64,
    /// Seconds a write waits for a lock on a target table before the batch fails and is retried.
    pub lock_timeout: f64,
    pub log_level: LogLevel,
    pub on_error: OnError,
    /// The parent tables events may write into (`tables` option); None: any table the job's
    /// role may write.
    pub tables: Option<TableList>,
}

/// An allow-list of `schema.table` and `schema.*` entries, names as logutriga writes them
/// (unquoted, exact case); an entry without a schema means `public`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableList {
    pub text: String,
    entries: Vec<(String, Option<String>)>,
}

impl TableList {
    pub fn parse(text: &str) -> Option<TableList> {
        let mut entries = Vec::new();
        for item in text.split(',').map(str::trim) {
            let (schema, table) = item.split_once('.').unwrap_or(("public", item));
            if schema.is_empty() || table.is_empty() {
                return None;
            }
            entries.push((schema.to_string(), (table != "*").then(|| table.to_string())));
        }
        Some(TableList { text: text.to_string(), entries })
    }

    pub fn allows(&self, schema: &str, table: &str) -> bool {
        self.entries.iter().any(|(s, t)| s == schema && t.as_deref().is_none_or(|t| t == table))
    }
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error(
        "invalid job name {0:?}: use lower-case letters, digits and '_', at most 40 bytes, not starting with a digit"
    )]
    BadJobName(String),
    #[error("{guc} is not set (required)")]
    Missing { guc: String },
    #[error("invalid value {value:?} for {guc}: {why}")]
    Invalid { guc: String, value: String, why: &'static str },
    #[error("{guc} is not an option of cube_dispatcher{}", match .nearest { Some(n) => format!("; did you mean {n}?"), None => String::new() })]
    Unknown { guc: String, nearest: Option<String> },
}

/// Settings under `cube_dispatcher.` that this job would read but that name no option: a typo
/// the original tool silently ignored. `names` are the settings the session has; a job's own
/// (`cube_dispatcher.<job>.<x>`) and the defaults for every job (`cube_dispatcher.<x>`) are
/// checked, other jobs' settings are theirs. `server` lists the extension's own GUCs.
pub fn check_names<'n>(job: &str, names: impl Iterator<Item = &'n str>, server: &[&str]) -> Result<(), ConfigError> {
    for guc in names {
        let lower = guc.to_ascii_lowercase();
        let Some(rest) = lower.strip_prefix("cube_dispatcher.") else { continue };
        let (prefix, option) = match rest.split_once('.') {
            Some((j, o)) if j == job => (format!("cube_dispatcher.{job}."), o),
            Some(_) => continue,
            None if server.contains(&rest) => continue,
            None => ("cube_dispatcher.".to_string(), rest),
        };
        if !OPTIONS.contains(&option) {
            let nearest = nearest_option(option).map(|n| format!("{prefix}{n}"));
            return Err(ConfigError::Unknown { guc: guc.to_string(), nearest });
        }
    }
    Ok(())
}

/// The option `name` is closest to, at most two edits away (Levenshtein).
fn nearest_option(name: &str) -> Option<&'static str> {
    let distance = |a: &str, b: &str| {
        let b: Vec<char> = b.chars().collect();
        let mut row: Vec<usize> = (0..=b.len()).collect();
        for (i, ca) in a.chars().enumerate() {
            let mut diagonal = row[0];
            row[0] = i + 1;
            for (j, cb) in b.iter().enumerate() {
                let next = (row[j + 1] + 1).min(row[j] + 1).min(diagonal + usize::from(ca != *cb));
                diagonal = row[j + 1];
                row[j + 1] = next;
            }
        }
        row[b.len()]
    };
    OPTIONS.iter().map(|o| (distance(name, o), *o)).filter(|(d, _)| *d <= 2).min().map(|(_, o)| o)
}

/// GUC names are case-folded identifiers joined by dots, so a job name must be one.
pub fn validate_job_name(job: &str) -> Result<(), ConfigError> {
    let ok = !job.is_empty()
        && job.len() <= 40
        && !job.as_bytes()[0].is_ascii_digit()
        && job.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(ConfigError::BadJobName(job.to_string()))
    }
}

pub fn job_guc(job: &str, option: &str) -> String {
    format!("cube_dispatcher.{job}.{option}")
}

impl JobConfig {
    /// `lookup(option)` returns the effective setting (job level, else global) and the GUC name
    /// it came from, or None when neither is set.
    pub fn from_settings(
        job: &str,
        lookup: &dyn Fn(&str) -> Option<(String, String)>,
        current_db: &str,
    ) -> Result<JobConfig, ConfigError> {
        validate_job_name(job)?;
        let get = |opt: &str| lookup(opt);
        let invalid =
            |guc: String, value: &str, why: &'static str| ConfigError::Invalid { guc, value: value.to_string(), why };
        let required = |opt: &str| -> Result<String, ConfigError> {
            match get(opt) {
                Some((v, _)) if !v.trim().is_empty() => Ok(v),
                Some((_, guc)) => Err(ConfigError::Missing { guc }),
                None => Err(ConfigError::Missing { guc: job_guc(job, opt) }),
            }
        };
        let src_db = required("src_db")?;
        let pgq_queue_name = required("pgq_queue_name")?;
        let pgq_consumer_id = match get("pgq_consumer_id") {
            Some((v, _)) if !v.is_empty() => v,
            _ => job.to_string(),
        };
        // an option with a fixed set of words: the default when unset, else one of the words
        fn choice<T>(
            got: Option<(String, String)>,
            default: T,
            parse: fn(&str) -> Option<T>,
            why: &'static str,
        ) -> Result<T, ConfigError> {
            match got {
                None => Ok(default),
                Some((v, guc)) => parse(v.trim()).ok_or(ConfigError::Invalid { guc, value: v, why }),
            }
        }
        let mode = choice(get("mode"), Mode::KeepLatest, Mode::parse, "expected keep_latest or keep_all")?;
        let dateformat = match get("dateformat") {
            None => Some("YYYY_MM_DD".to_string()),
            Some((v, _)) if v.is_empty() => None,
            Some((v, _)) => Some(v),
        };
        let part_template = get("part_template").map(|(v, _)| v);
        // `zero`: 0 is allowed (loop_delay: ask again at once, as the original accepted)
        let seconds = |opt: &str, default: f64, zero: bool| -> Result<f64, ConfigError> {
            match get(opt) {
                None => Ok(default),
                Some((v, guc)) => match v.trim().parse::<f64>() {
                    Ok(x) if x.is_finite() && (x > 0.0 || (zero && x == 0.0)) && x <= 86_400.0 => Ok(x),
                    _ if zero => Err(invalid(guc, &v, "expected a number of seconds from 0 to 86400")),
                    _ => Err(invalid(guc, &v, "expected a number of seconds greater than 0 and at most 86400")),
                },
            }
        };
        let loop_delay = seconds("loop_delay", 1.0, true)?;
        let connection_lifetime = seconds("connection_lifetime", 1200.0, false)?;
        let lock_timeout = seconds("lock_timeout", 60.0, false)?;
        let log_level =
            choice(get("log_level"), LogLevel::Normal, LogLevel::parse, "expected quiet, normal or verbose")?;
        let tables = match get("tables") {
            None => None,
            Some((v, _)) if v.trim().is_empty() => None,
            Some((v, guc)) => match TableList::parse(&v) {
                Some(t) => Some(t),
                None => return Err(invalid(guc, &v, "expected a comma-separated list of schema.table or schema.*")),
            },
        };
        let on_error = choice(get("on_error"), OnError::Retry, OnError::parse, "expected retry or dead_letter")?;
        if let Some((v, guc)) = get("dst_db") {
            let named = dst_db_name(&v);
            if !v.trim().is_empty() && named.as_deref() != Some(current_db) {
                return Err(invalid(guc, &mask_password(&v), "the job writes into the database where start() is called; dst_db must name that database or be unset"));
            }
        }
        Ok(JobConfig {
            job_name: job.to_string(),
            src_db,
            pgq_queue_name,
            pgq_consumer_id,
            mode,
            dateformat,
            part_template,
            loop_delay,
            connection_lifetime,
            lock_timeout,
            log_level,
            on_error,
            tables,
        })
    }
}

/// The database a libpq connection string names: `dbname=x` or the path of a URI.
pub fn dst_db_name(conninfo: &str) -> Option<String> {
    let s = conninfo.trim();
    if let Some(rest) = s.strip_prefix("postgresql://").or_else(|| s.strip_prefix("postgres://")) {
        let after_host = rest.split_once('/').map(|(_, p)| p)?;
        let db = after_host.split('?').next().unwrap_or("");
        return (!db.is_empty()).then(|| db.to_string());
    }
    if !s.contains('=') {
        return (!s.is_empty()).then(|| s.to_string());
    }
    conninfo_pairs(s).into_iter().find(|(k, _)| k == "dbname").map(|(_, v)| v)
}

/// key=value pairs of a libpq connection string, values unquoted ('...' with \' and \\).
fn conninfo_pairs(s: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut chars = s.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        let mut key = String::new();
        while let Some(&c) = chars.peek() {
            if c == '=' || c.is_whitespace() {
                break;
            }
            key.push(c);
            chars.next();
        }
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        if key.is_empty() || chars.next() != Some('=') {
            return out;
        }
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        let mut value = String::new();
        if chars.peek() == Some(&'\'') {
            chars.next();
            while let Some(c) = chars.next() {
                match c {
                    '\\' => value.extend(chars.next()),
                    '\'' => break,
                    c => value.push(c),
                }
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c.is_whitespace() {
                    break;
                }
                if c == '\\' {
                    chars.next();
                    value.extend(chars.next());
                    continue;
                }
                value.push(c);
                chars.next();
            }
        }
        out.push((key, value));
    }
}

/// Connection strings are shown (status view, logs, errors) with any password replaced.
pub fn mask_password(conninfo: &str) -> String {
    const MASK: &str = "********";
    let s = conninfo.trim();
    if let Some(scheme_end) = s.find("://").filter(|_| s.starts_with("postgres")) {
        let (scheme, rest) = s.split_at(scheme_end + 3);
        let (authority, tail) = match rest.find(['/', '?']) {
            Some(i) => rest.split_at(i),
            None => (rest, ""),
        };
        let authority = match authority.rsplit_once('@') {
            Some((userinfo, host)) => match userinfo.split_once(':') {
                Some((user, _)) => format!("{user}:{MASK}@{host}"),
                None => authority.to_string(),
            },
            None => authority.to_string(),
        };
        let tail = match tail.split_once('?') {
            Some((path, query)) => {
                let q: Vec<String> = query
                    .split('&')
                    .map(|kv| if kv.starts_with("password=") { format!("password={MASK}") } else { kv.to_string() })
                    .collect();
                format!("{path}?{}", q.join("&"))
            }
            None => tail.to_string(),
        };
        return format!("{scheme}{authority}{tail}");
    }
    let pairs = conninfo_pairs(s);
    if pairs.is_empty() {
        return conninfo.to_string();
    }
    pairs
        .into_iter()
        .map(|(k, v)| {
            if k == "password" {
                format!("password={MASK}")
            } else if v.is_empty() || v.chars().any(|c| c.is_whitespace() || c == '\'' || c == '\\') {
                format!("{k}='{}'", v.replace('\\', "\\\\").replace('\'', "\\'"))
            } else {
                format!("{k}={v}")
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn cfg(settings: &[(&str, &str)]) -> Result<JobConfig, ConfigError> {
        let map: HashMap<String, String> = settings.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        JobConfig::from_settings("sales", &|opt| map.get(opt).map(|v| (v.clone(), job_guc("sales", opt))), "target")
    }

    const BASE: &[(&str, &str)] = &[("src_db", "dbname=src"), ("pgq_queue_name", "q")];

    fn with(extra: &[(&'static str, &'static str)]) -> Vec<(&'static str, &'static str)> {
        BASE.iter().copied().chain(extra.iter().copied()).collect()
    }

    #[test]
    fn defaults() {
        let c = cfg(BASE).unwrap();
        assert_eq!(c.pgq_consumer_id, "sales");
        assert_eq!(c.mode, Mode::KeepLatest);
        assert_eq!(c.dateformat.as_deref(), Some("YYYY_MM_DD"));
        assert_eq!(c.part_template, None);
        assert_eq!((c.loop_delay, c.connection_lifetime), (1.0, 1200.0));
        assert_eq!(c.log_level, LogLevel::Normal);
        assert_eq!(c.on_error, OnError::Retry);
    }

    #[test]
    fn explicit_values() {
        let c = cfg(&with(&[
            ("mode", "keep_all"),
            ("dateformat", ""),
            ("part_template", ""),
            ("loop_delay", "0.25"),
            ("pgq_consumer_id", "c1"),
            ("log_level", "verbose"),
            ("dst_db", "host=/tmp dbname=target"),
            ("on_error", "dead_letter"),
        ]))
        .unwrap();
        assert_eq!(c.on_error, OnError::DeadLetter);
        assert_eq!((c.mode, c.dateformat, c.part_template.as_deref()), (Mode::KeepAll, None, Some("")));
        assert_eq!((c.loop_delay, c.pgq_consumer_id.as_str(), c.log_level), (0.25, "c1", LogLevel::Verbose));
        assert_eq!(cfg(&with(&[("loop_delay", "0")])).unwrap().loop_delay, 0.0, "the original accepted 0");
    }

    #[test]
    fn errors_name_the_guc() {
        let cases: Vec<(Vec<(&str, &str)>, &str)> = vec![
            (vec![("pgq_queue_name", "q")], "cube_dispatcher.sales.src_db is not set"),
            (vec![("src_db", "dbname=x")], "cube_dispatcher.sales.pgq_queue_name is not set"),
            (vec![("src_db", " "), ("pgq_queue_name", "q")], "cube_dispatcher.sales.src_db is not set"),
            (with(&[("mode", "keep_some")]), "invalid value \"keep_some\" for cube_dispatcher.sales.mode"),
            (with(&[("loop_delay", "-1")]), "for cube_dispatcher.sales.loop_delay"),
            (with(&[("connection_lifetime", "0")]), "for cube_dispatcher.sales.connection_lifetime"),
            (with(&[("loop_delay", "soon")]), "for cube_dispatcher.sales.loop_delay"),
            (with(&[("connection_lifetime", "-5")]), "for cube_dispatcher.sales.connection_lifetime"),
            (with(&[("log_level", "loud")]), "for cube_dispatcher.sales.log_level"),
            (with(&[("on_error", "skip")]), "invalid value \"skip\" for cube_dispatcher.sales.on_error"),
            (with(&[("dst_db", "dbname=other password=hunter2")]), "for cube_dispatcher.sales.dst_db"),
        ];
        for (settings, want) in cases {
            let err = cfg(&settings).unwrap_err().to_string();
            assert!(err.contains(want), "{settings:?}: {err}");
            assert!(!err.contains("hunter2"), "password leaked: {err}");
        }
        for bad in ["", "Sales", "1job", "a-b", "a.b", &"x".repeat(41)] {
            assert!(JobConfig::from_settings(bad, &|_| None, "t").is_err(), "{bad:?}");
        }
    }

    #[test]
    fn table_allow_list() {
        let t = TableList::parse("public.orders, Sales.*, items").unwrap();
        let cases = [
            ("public", "orders", true),
            ("public", "items", true),
            ("Sales", "Order Lines", true),
            ("sales", "x", false),
            ("public", "orders_2026", false),
            ("pg_catalog", "pg_authid", false),
            ("cube_dispatcher", "job", false),
        ];
        for (schema, table, want) in cases {
            assert_eq!(t.allows(schema, table), want, "{schema}.{table}");
        }
        assert!(TableList::parse("a.,b").is_none());
        assert!(cfg(&with(&[("tables", "x..")])).is_ok_and(|c| c.tables.unwrap().allows("x", ".")));
        assert!(cfg(&with(&[("tables", ",")])).unwrap_err().to_string().contains("cube_dispatcher.sales.tables"));
    }

    #[test]
    fn dst_db_names() {
        let cases = [
            ("dbname=target", Some("target")),
            ("host=/tmp port=5432 dbname='my db'", Some("my db")),
            ("postgresql://u:p@h:5/target?sslmode=disable", Some("target")),
            ("postgresql://h", None),
            ("target", Some("target")),
            ("host=/tmp", None),
        ];
        for (conn, want) in cases {
            assert_eq!(dst_db_name(conn).as_deref(), want, "{conn}");
        }
    }

    #[test]
    fn passwords_are_masked() {
        let cases = [
            ("host=/tmp dbname=src password=hunter2", "host=/tmp dbname=src password=********"),
            ("password='hun ter2' dbname=src", "password=******** dbname=src"),
            ("dbname = src password = hunter2", "dbname=src password=********"),
            ("postgresql://alice:hunter2@db.example:5432/src", "postgresql://alice:********@db.example:5432/src"),
            (
                "postgres://alice@h/src?password=hunter2&sslmode=require",
                "postgres://alice@h/src?password=********&sslmode=require",
            ),
            ("dbname=src", "dbname=src"),
        ];
        for (conn, want) in cases {
            assert_eq!(mask_password(conn), want, "{conn}");
        }
    }

    #[test]
    fn misspelt_settings_are_named_with_the_nearest_option() {
        let check = |names: &[&str]| check_names("sales", names.iter().copied(), &["databases"]);
        assert_eq!(
            check(&["cube_dispatcher.sales.mode", "cube_dispatcher.loop_delay", "cube_dispatcher.databases"]),
            Ok(())
        );
        // another job's settings are not this job's business
        assert_eq!(check(&["cube_dispatcher.other.modee"]), Ok(()));
        assert_eq!(
            check(&["cube_dispatcher.sales.modee"]).unwrap_err().to_string(),
            "cube_dispatcher.sales.modee is not an option of cube_dispatcher; did you mean cube_dispatcher.sales.mode?"
        );
        assert_eq!(
            check(&["cube_dispatcher.pgq_queue"]).unwrap_err().to_string(),
            "cube_dispatcher.pgq_queue is not an option of cube_dispatcher"
        );
        assert_eq!(
            check(&["cube_dispatcher.Sales.Dateformt"]),
            Err(ConfigError::Unknown {
                guc: "cube_dispatcher.Sales.Dateformt".into(),
                nearest: Some("cube_dispatcher.sales.dateformat".into())
            })
        );
    }
}
